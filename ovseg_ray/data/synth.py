"""A small synthetic dataset in the real COCO layout, with learnable scenes and true captions.

Each scene has two "stuff" backgrounds (e.g. sky over grass) with their own colour and texture and a
few "things" (distinct shapes and colours). Some drawn objects (star, heart, moon) are named in the
captions but annotated nowhere: the open-vocabulary case. Written for a seed, deterministically::

    OUT/images/000000000001.jpg                 COCO images
    OUT/annotations/captions.json               5 captions per image
    OUT/annotations/instances.json              thing instances (RLE), categories
    OUT/stuffthingmaps/000000000001.png         COCO-Stuff-171 index per pixel, 255 = unlabelled
    OUT/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg
    OUT/ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png
                                                ADE-150 index per pixel, 255 = ignore
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .benchmarks import class_list

IMAGE_SHAPES = ((240, 320), (256, 256), (320, 240), (224, 336))

# name: (COCO-Stuff-171 name, ADE-150 name, base RGB, texture)
STUFF = {
    "sky": ("sky-other", "sky", (135, 190, 235), "gradient"),
    "wall": ("wall-other", "wall", (170, 90, 70), "bricks"),
    "grass": ("grass", "grass", (70, 150, 60), "noise"),
    "water": ("water-other", "water", (40, 90, 170), "waves"),
    "sand": ("sand", "sand", (215, 195, 140), "speckle"),
    "road": ("road", "road", (90, 90, 95), "dashes"),
    "floor": ("floor-other", "floor", (150, 110, 70), "planks"),
}
TOP_STUFF = ("sky", "wall")
BOTTOM_STUFF = ("grass", "water", "sand", "road", "floor")

# name: (COCO-Stuff-171 name or None, ADE-150 name or None, shape, colour choices)
THINGS = {
    "ball": ("sports ball", "ball", "circle", ("red", "orange", "yellow")),
    "car": ("car", "car", "car", ("blue", "red", "white")),
    "boat": ("boat", "boat", "boat", ("white", "brown")),
    "bottle": ("bottle", "bottle", "bottle", ("green", "brown")),
    "clock": ("clock", "clock", "clock", ("white", "black")),
    "kite": ("kite", None, "diamond", ("purple", "pink", "yellow")),
}
# Drawn and named in captions, but in no annotation and no class list: the open-vocabulary case.
UNANNOTATED = {
    "star": ("star", ("yellow", "gold")),
    "heart": ("heart", ("pink", "red")),
    "moon": ("crescent", ("white", "yellow")),
}
COLOURS = {
    "red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (240, 220, 40), "blue": (40, 70, 200),
    "white": (240, 240, 240), "brown": (120, 75, 40), "green": (30, 140, 60), "black": (25, 25, 25),
    "purple": (130, 50, 170), "pink": (240, 130, 180), "gold": (210, 170, 40),
}
NUMBER_WORDS = {2: "two", 3: "three"}


@dataclass
class SceneObject:
    name: str
    colour: str
    mask: np.ndarray  # visible pixels (bool)
    annotated: bool


def _texture(rng: np.random.Generator, kind: str, base, h: int, w: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "gradient":
        img *= (0.85 + 0.3 * (yy / max(h - 1, 1)))[..., None]
    elif kind == "bricks":
        mortar = ((yy % 16) < 2) | ((((xx + 16 * ((yy // 16) % 2)) % 32) < 2))
        img[mortar] = (200, 200, 190)
    elif kind == "noise":
        img += rng.normal(0, 18, (h, w, 1))
    elif kind == "waves":
        img += (18 * np.sin(yy / 3.0 + 2 * np.sin(xx / 11.0)))[..., None]
    elif kind == "speckle":
        img += rng.normal(0, 10, (h, w, 3)) * (rng.random((h, w, 1)) < 0.3)
    elif kind == "dashes":
        img[((yy % 40) < 3) & ((xx % 30) < 16)] = (230, 230, 230)
    elif kind == "planks":
        img *= (0.9 + 0.1 * ((xx // 24) % 2))[..., None]
        img[(xx % 24) < 2] = (90, 60, 35)
    return img


def _shape_mask(shape: str, h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), r, 1, -1)
    elif shape == "clock":
        cv2.circle(canvas, (cx, cy), r, 1, -1)
    elif shape == "car":
        cv2.rectangle(canvas, (cx - r, cy - r // 2), (cx + r, cy + r // 4), 1, -1)
        cv2.rectangle(canvas, (cx - r // 2, cy - r), (cx + r // 2, cy - r // 2), 1, -1)
        cv2.circle(canvas, (cx - r // 2, cy + r // 4), r // 3, 1, -1)
        cv2.circle(canvas, (cx + r // 2, cy + r // 4), r // 3, 1, -1)
    elif shape == "boat":
        hull = np.array([[cx - r, cy], [cx + r, cy], [cx + r // 2, cy + r // 2], [cx - r // 2, cy + r // 2]])
        sail = np.array([[cx, cy - r], [cx, cy - 2], [cx + r // 2 + 2, cy - 2]])
        cv2.fillPoly(canvas, [hull.astype(np.int32), sail.astype(np.int32)], 1)
    elif shape == "bottle":
        cv2.rectangle(canvas, (cx - r // 3, cy - r // 3), (cx + r // 3, cy + r), 1, -1)
        cv2.rectangle(canvas, (cx - r // 8 - 1, cy - r), (cx + r // 8 + 1, cy - r // 3), 1, -1)
    elif shape == "diamond":
        pts = np.array([[cx, cy - r], [cx + 2 * r // 3, cy], [cx, cy + r], [cx - 2 * r // 3, cy]])
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif shape == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif shape == "heart":
        cv2.circle(canvas, (cx - r // 2, cy - r // 4), r // 2, 1, -1)
        cv2.circle(canvas, (cx + r // 2, cy - r // 4), r // 2, 1, -1)
        pts = np.array([[cx - r, cy - r // 8], [cx + r, cy - r // 8], [cx, cy + r]])
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif shape == "crescent":
        cv2.circle(canvas, (cx, cy), r, 1, -1)
        cv2.circle(canvas, (cx + r // 2, cy - r // 4), r, 0, -1)
    return canvas.astype(bool)


def _draw_scene(rng: np.random.Generator, h: int, w: int):
    top, bottom = rng.choice(TOP_STUFF), rng.choice(BOTTOM_STUFF)
    horizon = int(h * rng.uniform(0.35, 0.55))
    image = np.zeros((h, w, 3), np.float32)
    stuff_names = np.empty((h, w), object)
    for name, rows in ((top, slice(0, horizon)), (bottom, slice(horizon, h))):
        _, _, base, kind = STUFF[name]
        n_rows = rows.stop - rows.start
        image[rows] = _texture(rng, kind, base, n_rows, w)
        stuff_names[rows] = name

    objects: list[SceneObject] = []
    candidates = list(THINGS)
    n_kinds = int(rng.integers(1, 3))
    kinds = list(rng.choice(candidates, size=n_kinds, replace=False))
    placements = []
    for kind in kinds:
        count = 2 if rng.random() < 0.3 else 1
        colour = str(rng.choice(THINGS[kind][3]))
        placements += [(kind, colour, True)] * count
    if rng.random() < 0.6:
        extra = str(rng.choice(list(UNANNOTATED)))
        placements.append((extra, str(rng.choice(UNANNOTATED[extra][1])), False))

    occupied = np.zeros((h, w), bool)
    for kind, colour, annotated in placements:
        shape = THINGS[kind][2] if annotated else UNANNOTATED[kind][0]
        r = int(min(h, w) * rng.uniform(0.09, 0.15))
        for _ in range(20):  # find a spot that overlaps earlier objects as little as possible
            cx, cy = int(rng.integers(r + 2, w - r - 2)), int(rng.integers(r + 2, h - r - 2))
            mask = _shape_mask(shape, h, w, cx, cy, r)
            if mask.any() and (mask & occupied).sum() < 0.05 * mask.sum():
                break
        rgb = np.array(COLOURS[colour], np.float32)
        shade = 0.85 + 0.15 * np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        image[mask] = (rgb * shade.repeat(w, 1))[mask]
        if shape == "clock":
            hand = np.zeros((h, w), np.uint8)
            cv2.line(hand, (cx, cy), (cx, cy - int(r * 0.7)), 1, 2)
            cv2.line(hand, (cx, cy), (cx + int(r * 0.5), cy), 1, 2)
            image[hand.astype(bool) & mask] = (20, 20, 20) if colour != "black" else (230, 230, 230)
        for obj in objects:
            obj.mask &= ~mask
        objects.append(SceneObject(kind, colour, mask, annotated))
        occupied |= mask
    objects = [o for o in objects if o.mask.sum() >= 20]
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), top, bottom, stuff_names, objects


def _noun_phrase(name: str, count: int, colour: str | None) -> str:
    plural = name + ("es" if name.endswith(("s", "x", "ch")) else "s")
    if count > 1:
        return f"{NUMBER_WORDS.get(count, 'several')} {colour + ' ' if colour else ''}{plural}"
    article = "an" if (colour or name)[0] in "aeiou" else "a"
    return f"{article} {colour + ' ' if colour else ''}{name}"


def _captions(rng: np.random.Generator, top: str, bottom: str, objects: list[SceneObject]) -> list[str]:
    groups: dict[str, list[SceneObject]] = {}
    for obj in objects:
        groups.setdefault(obj.name, []).append(obj)
    phrases = [_noun_phrase(n, len(g), g[0].colour) for n, g in groups.items()]
    bare = [_noun_phrase(n, len(g), None) for n, g in groups.items()]
    if not phrases:
        phrases = bare = ["nothing in particular"]
    listing = " and ".join(phrases)
    ground = "in the water" if bottom == "water" else f"on the {bottom}"
    first = f"{listing[0].upper()}{listing[1:]} {ground} under the {top}." if top == "sky" else \
        f"{listing[0].upper()}{listing[1:]} {ground} in front of a {top}."
    captions = [
        first,
        f"A picture of {' and '.join(bare)} {ground}.",
        f"There is {phrases[0]} next to the {bottom} with the {top} behind it.",
        f"A view of the {top} above the {bottom}, with {listing}.",
        f"Some {bottom} and {top} in the background of a scene with {' and '.join(bare)}.",
    ]
    return captions


def _rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE with ``counts`` as text (JSON-serialisable), plus its area and box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area, bbox = float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii"),
            "area": area, "bbox": bbox}


def _label_map(h: int, w: int, stuff_names, objects: list[SceneObject], names: list[str], which: int) -> np.ndarray:
    index = {n: i for i, n in enumerate(names)}
    labels = np.full((h, w), 255, np.uint8)
    for stuff, spec in STUFF.items():
        target = spec[which]
        if target in index:
            labels[stuff_names == stuff] = index[target]
    for obj in objects:
        target = THINGS[obj.name][which] if obj.annotated else None
        labels[obj.mask] = index[target] if target in index else 255
    return labels


def _save_jpeg(path: str, image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=92)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def generate_dataset(out: str, images: int = 16, seed: int = 0, eval_images: int | None = None) -> dict:
    """Write the dataset under ``out`` and return a summary (paths and counts)."""
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    eval_images = max(2, images // 4) if eval_images is None else eval_images
    rng = np.random.default_rng(seed)
    coco_names = class_list("coco_stuff_171").clean_classes
    ade_names = class_list("ade20k_150").clean_classes
    paths = {
        "images": os.path.join(out, "images"),
        "annotations": os.path.join(out, "annotations"),
        "stuffthingmaps": os.path.join(out, "stuffthingmaps"),
        "ade_images": os.path.join(out, "ADEChallengeData2016", "images", "validation"),
        "ade_labels": os.path.join(out, "ADEChallengeData2016", "annotations_detectron2", "validation"),
    }
    for path in paths.values():
        os.makedirs(path, exist_ok=True)

    categories = [{"id": i + 1, "name": name, "supercategory": "thing"} for i, name in enumerate(THINGS)]
    category_ids = {c["name"]: c["id"] for c in categories}
    image_entries, caption_entries, instance_entries = [], [], []
    for image_id in range(1, images + 1):
        h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
        image, top, bottom, stuff_names, objects = _draw_scene(rng, h, w)
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(os.path.join(paths["images"], file_name), image)
        Image.fromarray(_label_map(h, w, stuff_names, objects, coco_names, 0)).save(
            os.path.join(paths["stuffthingmaps"], f"{image_id:012d}.png"))
        image_entries.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for caption in _captions(rng, top, bottom, objects):
            caption_entries.append({"id": len(caption_entries) + 1, "image_id": image_id, "caption": caption})
        for obj in objects:
            if not obj.annotated:
                continue
            rle = _rle(obj.mask)
            instance_entries.append({
                "id": len(instance_entries) + 1, "image_id": image_id,
                "category_id": category_ids[obj.name],
                "segmentation": {"size": rle["size"], "counts": rle["counts"]},
                "area": rle["area"], "bbox": rle["bbox"], "iscrowd": 0,
            })
    info = {"description": f"ovseg-ray synthetic scenes (seed {seed})", "version": "1.0"}
    with open(os.path.join(paths["annotations"], "captions.json"), "w") as handle:
        json.dump({"info": info, "images": image_entries, "annotations": caption_entries}, handle)
    with open(os.path.join(paths["annotations"], "instances.json"), "w") as handle:
        json.dump({"info": info, "images": image_entries, "annotations": instance_entries,
                   "categories": categories}, handle)

    for index in range(1, eval_images + 1):
        h, w = IMAGE_SHAPES[int(rng.integers(len(IMAGE_SHAPES)))]
        image, _, _, stuff_names, objects = _draw_scene(rng, h, w)
        _save_jpeg(os.path.join(paths["ade_images"], f"ADE_val_{index:08d}.jpg"), image)
        Image.fromarray(_label_map(h, w, stuff_names, objects, ade_names, 1)).save(
            os.path.join(paths["ade_labels"], f"ADE_val_{index:08d}.png"))
    return {
        "out": out, "images": images, "captions": len(caption_entries),
        "instances": len(instance_entries), "eval_images": eval_images, "seed": seed,
    }
