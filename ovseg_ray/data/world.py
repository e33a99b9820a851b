"""The open world of the small-scale reproduction: 72 classes, scenes drawn from a seed, true captions.

Classes are fixed (the same for every seed): 16 stuff classes (backgrounds: textures and gradients)
and 56 things, each a noun of one or two words bound to a shape, a colour and a pattern (a "lemon" is
a yellow ellipse, a "beach ball" a striped circle, a "ball" a plain red one). A fixed split makes 52
classes *seen* (their pixels are annotated in the training split, as COCO-Stuff's 171 are) and 20
*unseen* (drawn in the training images and named in their captions, but never annotated).

A scene is one to three stuff regions (a horizon, a side split or a wavy boundary) and two to six
things of varied size, some overlapping others (occlusion) or cut by the frame. Its five captions, in
varied English (articles, counts and plurals, colour and size adjectives, synonyms, relations such as
"next to", nouns that name no class), each mention some of the objects, never all, as COCO's do.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

COLOURS = {
    "red": (205, 40, 40), "orange": (240, 140, 30), "yellow": (240, 215, 45), "lime": (150, 210, 50),
    "green": (40, 140, 60), "teal": (30, 150, 150), "cyan": (90, 210, 230), "blue": (45, 75, 205),
    "navy": (30, 35, 110), "purple": (125, 55, 170), "pink": (240, 135, 180), "brown": (125, 80, 45),
    "beige": (225, 205, 160), "white": (240, 240, 240), "gray": (130, 130, 135), "black": (30, 30, 30),
    "gold": (215, 170, 40),
}

# stuff: name -> (base colour, texture, synonyms); textures are drawn by _stuff_texture
STUFF = {
    "sky": ("cyan", "gradient", ("blue sky",)), "galaxy": ("navy", "stars", ("cosmos",)),
    "grass": ("green", "noise", ("lawn",)), "sand": ("beige", "speckle", ("beach",)),
    "water": ("blue", "waves", ("sea", "lake")), "snow": ("white", "noise", ()),
    "road": ("gray", "dashes", ("street",)), "brick wall": ("red", "bricks", ("wall",)),
    "floor": ("brown", "planks", ("parquet",)), "carpet": ("purple", "weave", ("rug",)),
    "tile": ("white", "grid", ("tile floor",)), "forest": ("green", "blobs", ("woods", "trees")),
    "dirt": ("brown", "noise", ("mud",)), "ice": ("cyan", "smooth", ()),
    "field": ("lime", "rows", ("meadow",)), "marble": ("white", "veins", ()),
}

# thing: name -> (shape, colour, pattern, synonyms)
THINGS = {
    "ball": ("circle", "red", "solid", ()), "beach ball": ("circle", "yellow", "stripes", ()),
    "tennis ball": ("circle", "lime", "solid", ()), "apple": ("circle", "green", "solid", ()),
    "coin": ("circle", "gold", "outline", ()), "plate": ("circle", "white", "outline", ("dish",)),
    "clock": ("circle", "white", "cross", ("watch",)), "cookie": ("circle", "brown", "dots", ("biscuit",)),
    "lemon": ("ellipse", "yellow", "solid", ()), "egg": ("ellipse", "white", "solid", ()),
    "potato": ("ellipse", "brown", "dots", ()), "melon": ("ellipse", "green", "stripes", ()),
    "donut": ("ring", "pink", "solid", ("doughnut",)), "tire": ("ring", "black", "solid", ("tyre",)),
    "bracelet": ("ring", "gold", "solid", ()), "lifebuoy": ("ring", "orange", "stripes", ()),
    "box": ("square", "brown", "solid", ("crate",)), "gift box": ("square", "red", "checker", ("present",)),
    "window": ("square", "cyan", "grid", ()), "dice": ("square", "white", "dots", ("die",)),
    "book": ("wide", "blue", "outline", ()), "bench": ("wide", "brown", "stripes", ()),
    "sofa": ("wide", "purple", "solid", ("couch",)), "bus": ("wide", "yellow", "grid", ()),
    "door": ("tall", "brown", "outline", ()), "tower": ("tall", "gray", "stripes", ()),
    "bottle": ("bottle", "green", "solid", ()), "vase": ("bottle", "teal", "dots", ()),
    "tent": ("triangle", "orange", "solid", ()), "pizza slice": ("triangle", "yellow", "dots", ("pizza",)),
    "pyramid": ("triangle", "beige", "stripes", ()), "traffic cone": ("triangle", "orange", "stripes", ("cone",)),
    "star": ("star", "yellow", "solid", ()), "starfish": ("star", "pink", "dots", ()),
    "badge": ("star", "gold", "outline", ("medal",)), "heart": ("heart", "red", "solid", ()),
    "cushion": ("heart", "pink", "checker", ("pillow",)), "moon": ("crescent", "white", "solid", ()),
    "banana": ("crescent", "yellow", "solid", ()), "stop sign": ("octagon", "red", "outline", ("sign",)),
    "nut": ("hexagon", "gray", "solid", ("bolt",)), "honeycomb": ("hexagon", "gold", "grid", ()),
    "kite": ("diamond", "purple", "solid", ()), "gem": ("diamond", "cyan", "solid", ("jewel",)),
    "cactus": ("cross", "green", "solid", ()), "toolbox": ("cross", "white", "outline", ("kit",)),
    "umbrella": ("umbrella", "blue", "stripes", ("parasol",)), "mushroom": ("mushroom", "red", "dots", ()),
    "tree": ("tree", "green", "solid", ()), "house": ("house", "beige", "solid", ("home", "hut")),
    "car": ("car", "blue", "solid", ("automobile",)), "taxi": ("car", "yellow", "checker", ("cab",)),
    "boat": ("boat", "white", "solid", ("ship",)), "fish": ("fish", "orange", "solid", ()),
    "balloon": ("balloon", "red", "solid", ()), "flag": ("flag", "red", "stripes", ("banner",)),
}

# The fixed split: these never appear in a training annotation (the rest are "seen").
UNSEEN = (
    "tennis ball", "coin", "potato", "bracelet", "dice", "sofa", "vase", "pizza slice", "traffic cone",
    "starfish", "cushion", "banana", "honeycomb", "gem", "toolbox", "taxi",
    "galaxy", "carpet", "ice", "marble",
)
CLASSES = (*STUFF, *THINGS)
SEEN = tuple(c for c in CLASSES if c not in UNSEEN)
# How captions say a colour: words a tagger reads as adjectives (it takes "cyan" or "gold" for nouns).
COLOUR_WORDS = {"lime": "green", "teal": "green", "cyan": "blue", "navy": "blue", "gold": "yellow", "beige": "white"}
COUNT_WORDS = {2: "two", 3: "three"}
FILLER = ("picture", "photo", "scene", "view", "toy", "object", "thing", "day", "corner", "display", "group")
RELATIONS = ("next to", "near", "beside", "above", "below", "in front of", "behind", "close to")


@dataclass
class Thing:
    name: str
    mask: np.ndarray  # visible pixels
    area: float  # visible share of the image


def _rgb(colour: str, rng: np.random.Generator, jitter: float = 12.0) -> np.ndarray:
    return np.array(COLOURS[colour], np.float32) + rng.normal(0, jitter, 3).astype(np.float32)


def _stuff_texture(rng: np.random.Generator, name: str, h: int, w: int) -> np.ndarray:
    colour, kind, _ = STUFF[name]
    img = np.empty((h, w, 3), np.float32)
    img[:] = _rgb(colour, rng)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28)
    if kind == "gradient":
        img *= (0.8 + 0.35 * (yy / max(h - 1, 1)))[..., None]
    elif kind == "stars":
        img[rng.random((h, w)) < 0.01] = (240, 240, 200)
    elif kind == "noise":
        img += rng.normal(0, 16, (h, w, 1))
    elif kind == "speckle":
        img += rng.normal(0, 14, (h, w, 3)) * (rng.random((h, w, 1)) < 0.35)
    elif kind == "waves":
        img += (20 * np.sin(yy / 2.5 + 2 * np.sin(xx / 9.0 + phase)))[..., None]
    elif kind == "dashes":
        img[((yy % 24) < 2) & (((xx + int(phase * 10)) % 20) < 10)] = (235, 235, 235)
    elif kind == "bricks":
        img[((yy % 10) < 1) | ((((xx + 10 * ((yy // 10) % 2)) % 20) < 1))] = (205, 200, 190)
    elif kind == "planks":
        img *= (0.85 + 0.15 * ((xx // 14) % 2))[..., None]
    elif kind == "weave":
        img *= (0.85 + 0.15 * (((xx // 3) + (yy // 3)) % 2))[..., None]
    elif kind == "grid":
        img[((yy % 16) < 1) | ((xx % 16) < 1)] = (120, 120, 125)
    elif kind == "blobs":
        img *= (0.75 + 0.25 * (np.sin(xx / 5.0 + phase) * np.sin(yy / 6.0)))[..., None]
    elif kind == "rows":
        img *= (0.85 + 0.15 * np.sin((xx + yy) / 3.0))[..., None]
    elif kind == "veins":
        img -= (60 * (np.abs(np.sin(xx / 17.0 + 3 * np.sin(yy / 23.0 + phase))) < 0.05))[..., None]
    return img


def _polygon(cx: float, cy: float, r: float, sides: int, start: float = -np.pi / 2, inner: float | None = None):
    count = sides * (2 if inner else 1)
    angles = start + np.arange(count) * 2 * np.pi / count
    radii = np.where(np.arange(count) % 2 == 0, r, r * inner) if inner else np.full(count, r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)


def shape_mask(shape: str, h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    """The pixels of one shape of radius ``r`` around (cx, cy), clipped to the (h, w) frame."""
    c = np.zeros((h, w), np.uint8)
    q = max(1, r // 4)
    if shape == "circle":
        cv2.circle(c, (cx, cy), r, 1, -1)
    elif shape == "ellipse":
        cv2.ellipse(c, (cx, cy), (r, int(r * 0.65)), 0, 0, 360, 1, -1)
    elif shape == "ring":
        cv2.circle(c, (cx, cy), r, 1, -1)
        cv2.circle(c, (cx, cy), int(r * 0.5), 0, -1)
    elif shape in ("square", "wide", "tall"):
        rx, ry = {"square": (r, r), "wide": (r, int(r * 0.55)), "tall": (int(r * 0.5), r)}[shape]
        cv2.rectangle(c, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
    elif shape in ("triangle", "octagon", "hexagon", "diamond"):
        sides, start = {"triangle": (3, -np.pi / 2), "octagon": (8, np.pi / 8), "hexagon": (6, 0),
                        "diamond": (4, -np.pi / 2)}[shape]
        points = _polygon(cx, cy, r, sides, start)
        if shape == "diamond":
            points[:, 0] = cx + (points[:, 0] - cx) * 0.6
        cv2.fillPoly(c, [points], 1)
    elif shape == "star":
        cv2.fillPoly(c, [_polygon(cx, cy, r, 5, inner=0.45)], 1)
    elif shape == "heart":
        cv2.circle(c, (cx - r // 2, cy - r // 4), r // 2, 1, -1)
        cv2.circle(c, (cx + r // 2, cy - r // 4), r // 2, 1, -1)
        cv2.fillPoly(c, [np.array([[cx - r, cy - r // 8], [cx + r, cy - r // 8], [cx, cy + r]], np.int32)], 1)
    elif shape == "crescent":
        cv2.circle(c, (cx, cy), r, 1, -1)
        cv2.circle(c, (cx + r // 2, cy - r // 4), r, 0, -1)
    elif shape == "cross":
        cv2.rectangle(c, (cx - q, cy - r), (cx + q, cy + r), 1, -1)
        cv2.rectangle(c, (cx - r, cy - q), (cx + r, cy + q), 1, -1)
    elif shape == "bottle":
        cv2.rectangle(c, (cx - r // 2, cy - r // 3), (cx + r // 2, cy + r), 1, -1)
        cv2.rectangle(c, (cx - q // 2 - 1, cy - r), (cx + q // 2 + 1, cy - r // 3), 1, -1)
    elif shape in ("umbrella", "mushroom"):
        cv2.ellipse(c, (cx, cy), (r, int(r * 0.7)), 0, 180, 360, 1, -1)
        stem = q // 2 + 1 if shape == "umbrella" else q
        cv2.rectangle(c, (cx - stem, cy), (cx + stem, cy + r), 1, -1)
    elif shape == "tree":
        cv2.fillPoly(c, [_polygon(cx, cy - q, r, 3)], 1)
        cv2.rectangle(c, (cx - q // 2 - 1, cy + r // 3), (cx + q // 2 + 1, cy + r), 1, -1)
    elif shape == "house":
        cv2.rectangle(c, (cx - int(r * 0.7), cy - r // 5), (cx + int(r * 0.7), cy + r), 1, -1)
        cv2.fillPoly(c, [np.array([[cx - r, cy - r // 5], [cx + r, cy - r // 5], [cx, cy - r]], np.int32)], 1)
    elif shape == "car":
        cv2.rectangle(c, (cx - r, cy - r // 3), (cx + r, cy + r // 3), 1, -1)
        cv2.rectangle(c, (cx - r // 2, cy - int(r * 0.75)), (cx + r // 2, cy - r // 3), 1, -1)
        for side in (-1, 1):
            cv2.circle(c, (cx + side * r // 2, cy + r // 3), q + 1, 1, -1)
    elif shape == "boat":
        hull = np.array([[cx - r, cy], [cx + r, cy], [cx + r // 2, cy + r // 2], [cx - r // 2, cy + r // 2]])
        sail = np.array([[cx, cy - r], [cx, cy - 2], [cx + r // 2 + 2, cy - 2]])
        cv2.fillPoly(c, [hull.astype(np.int32), sail.astype(np.int32)], 1)
    elif shape == "fish":
        cv2.ellipse(c, (cx, cy), (int(r * 0.7), int(r * 0.4)), 0, 0, 360, 1, -1)
        tail = np.array([[cx + int(r * 0.6), cy], [cx + r, cy - r // 2], [cx + r, cy + r // 2]], np.int32)
        cv2.fillPoly(c, [tail], 1)
    elif shape == "balloon":
        cv2.ellipse(c, (cx, cy - q), (int(r * 0.7), int(r * 0.85)), 0, 0, 360, 1, -1)
        cv2.line(c, (cx, cy + int(r * 0.6)), (cx, cy + r + q), 1, 1)
    elif shape == "flag":
        cv2.rectangle(c, (cx - r, cy - r), (cx - r + max(1, q // 2), cy + r), 1, -1)
        cv2.rectangle(c, (cx - r, cy - r), (cx + r, cy), 1, -1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return c.astype(bool)


def _paint(image: np.ndarray, mask: np.ndarray, colour: str, pattern: str, rng: np.random.Generator) -> None:
    rgb = _rgb(colour, rng)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return
    y0, x0 = ys.min(), xs.min()
    yy, xx = ys - y0, xs - x0
    dark, light = rgb * 0.45, np.minimum(rgb * 0.6 + 110, 255)
    values = np.tile(rgb, (len(ys), 1))
    if pattern == "stripes":
        values[(yy // 3) % 2 == 1] = light
    elif pattern == "dots":
        values[((yy % 6) < 2) & ((xx % 6) < 2)] = dark
    elif pattern == "checker":
        values[((yy // 4) + (xx // 4)) % 2 == 1] = light
    elif pattern == "grid":
        values[((yy % 6) == 0) | ((xx % 6) == 0)] = dark
    elif pattern in ("outline", "cross"):
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        values[~inner[ys, xs]] = dark
        if pattern == "cross":
            cy, cx = int(ys.mean()), int(xs.mean())
            values[(ys == cy) | (xs == cx)] = dark
    image[ys, xs] = values * rng.uniform(0.9, 1.1)


def draw_scene(rng: np.random.Generator, h: int, w: int,
               close_up: bool = False) -> tuple[np.ndarray, np.ndarray, list[str], list[Thing]]:
    """(image uint8, stuff index map (h, w) into the stuff names, the stuff names, the visible things).

    ``close_up``: one or two things large near the middle (radius 25-45 % of the short side), as the
    object-centric photos of web data show them; otherwise two to six at 8-24 %, anywhere."""
    names = list(rng.choice(list(STUFF), size=int(rng.choice([1, 2, 2, 3])), replace=False))
    layout = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    if len(names) > 1:
        mode = rng.integers(3)
        wobble = rng.uniform(0, 8) * np.sin(xx / rng.uniform(8, 20) + rng.uniform(0, 6))
        cuts = np.sort(rng.uniform(0.25, 0.75, len(names) - 1))
        axis = yy / h if mode != 1 else xx / w
        for cut in cuts:
            layout += (axis + (wobble / h if mode == 2 else 0)) > cut
    image = np.zeros((h, w, 3), np.float32)
    for index, name in enumerate(names):
        region = layout == index
        image[region] = _stuff_texture(rng, name, h, w)[region]
    things: list[Thing] = []
    for _ in range(int(rng.integers(1, 3) if close_up else rng.integers(2, 7))):
        name = str(rng.choice(list(THINGS)))
        shape, colour, pattern, _ = THINGS[name]
        if close_up:
            r = int(min(h, w) * rng.uniform(0.25, 0.45))
            cx, cy = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.3, 0.7))
        else:
            r = int(min(h, w) * rng.uniform(0.08, 0.24))
            cx, cy = int(rng.integers(-r // 3, w + r // 3)), int(rng.integers(-r // 3, h + r // 3))
        mask = shape_mask(shape, h, w, cx, cy, r)
        if mask.sum() < 30:
            continue
        _paint(image, mask, colour, pattern, rng)
        for earlier in things:
            earlier.mask &= ~mask
        things.append(Thing(name, mask, 0.0))
    things = [t for t in things if t.mask.sum() >= 30]
    for thing in things:
        thing.area = float(thing.mask.mean())
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), layout, names, things


def _phrase(rng: np.random.Generator, name: str, count: int, colour: str | None, size: str | None) -> str:
    synonyms = THINGS[name][3] if name in THINGS else STUFF[name][2]
    noun = str(rng.choice(synonyms)) if synonyms and rng.random() < 0.2 else name
    words = [w for w in (size, colour) if w]
    if count > 1:
        plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
        return " ".join([COUNT_WORDS.get(count, "several"), *words, plural])
    head = " ".join([*words, noun])
    return ("an " if head[0] in "aeiou" else "a ") + head


def captions(rng: np.random.Generator, stuff: list[str], things: list[Thing]) -> list[str]:
    """Five captions, each naming a few of the things (most often the large ones) and maybe a stuff."""
    groups: dict[str, list[Thing]] = {}
    for thing in things:
        groups.setdefault(thing.name, []).append(thing)
    order = sorted(groups, key=lambda n: -sum(t.area for t in groups[n]))
    out = []
    for _ in range(5):
        k = max(1, min(len(order), int(rng.integers(1, 4))))
        weights = np.array([sum(t.area for t in groups[n]) for n in order]) + 0.02
        chosen = list(rng.choice(order, size=k, replace=False, p=weights / weights.sum())) if order else []
        phrases = []
        for name in chosen:
            area = sum(t.area for t in groups[name])
            size = None if rng.random() < 0.7 else ("small" if area < 0.03 else "large")
            colour = THINGS[name][1] if rng.random() < 0.35 else None
            colour = COLOUR_WORDS.get(colour, colour)
            phrases.append(_phrase(rng, name, len(groups[name]), colour, size))
        ground = _phrase(rng, str(rng.choice(stuff)), 1, None, None).split(" ", 1)[1]
        word = str(rng.choice(FILLER))
        filler = ("an " if word[0] in "aeiou" else "a ") + word
        if not phrases:
            text = f"{filler} of {ground} with nothing else."
        elif len(phrases) == 1:
            text = str(rng.choice([f"{phrases[0]} on the {ground}.", f"{filler} of {phrases[0]}.",
                                   f"There is {phrases[0]} in the {ground}.", f"{phrases[0]} lying around."]))
        else:
            rest = " and ".join(phrases[1:])
            text = str(rng.choice([f"{phrases[0]} {rng.choice(RELATIONS)} {rest}.",
                                   f"{filler} with {', '.join(phrases[:-1])} and {phrases[-1]}.",
                                   f"{phrases[0]} and {rest} on the {ground}."]))
        out.append(text[0].upper() + text[1:])
    return out
