"""The reproduction's report: ``results.md`` laid out like the paper's Tables 2 and 3 plus the oracle
rows, ``results.json``, ``figure.png`` (the same held-out images under the pretrained CLIP and FT then
MPT) and ``model_card.md`` for the model a reproduction would ship."""

from __future__ import annotations

import json
import os

import numpy as np

from ..data import storage


def _cell(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _scores(result: dict) -> tuple:
    m = result["metrics"]
    return m["mIoU"], m.get("mIoU_seen"), m.get("mIoU_unseen")


def _summary(config, row: str) -> dict:
    path = config.path("runs", row, "final", "summary.json")
    return json.loads(storage.read_bytes(path)) if os.path.exists(path) else {}


def tables(config, results: dict[str, dict]) -> str:
    from .reproduce import ROWS

    lines = [f"# OVSeg at small scale: open world, seed {config.seed}", "",
             f"{config.images} training images, {config.eval_images} held-out evaluation images, "
             f"{config.clip_images or config.images} images pretraining the CLIP; 72 classes "
             f"(52 seen in the MaskFormer's annotations, 20 unseen). mIoU (%) on the held-out split, all / seen / "
             "unseen classes; the full two-stage inference (lambda 0.7) unless the row says otherwise.", "",
             "## Table 3: adapting CLIP to masked images (mined pairs)", "",
             "| CLIP | all | seen | unseen |", "|---|---|---|---|"]
    for row in ("pretrained", "mpt", "ft", "ft-mpt"):
        lines.append(f"| {ROWS[row]} | " + " | ".join(_cell(v) for v in _scores(results[row])) + " |")
    lines += ["", "## Table 2: the data CLIP is fine-tuned on (FT)", "",
              "| training data | pairs | unique nouns | all | seen | unseen |", "|---|---|---|---|---|---|"]
    for row, label in (("gt-ft", "GT masks + GT class names (seen classes)"), ("ft", "mined: proposals + caption nouns")):
        summary = _summary(config, row)
        lines.append(f"| {label} | {summary.get('pairs', '-')} | {summary.get('vocabulary_size', '-')} | "
                     + " | ".join(_cell(v) for v in _scores(results[row])) + " |")
    lines += ["", "## Oracle analysis (paper section 1): which stage is the bottleneck?", "",
              "| masks + classifier | all | seen | unseen |", "|---|---|---|---|"]
    for row in ("oracle-masks", "oracle-labels", "maskformer-only", "pretrained"):
        lines.append(f"| {ROWS[row]} | " + " | ".join(_cell(v) for v in _scores(results[row])) + " |")
    return "\n".join(lines) + "\n"


def figure(config, models: dict[str, tuple[str, str]], path: str) -> None:
    """Held-out images: the image, its ground truth, the pretrained CLIP's and FT then MPT's segmentation."""
    import cv2

    from ..data.benchmarks import read_class_names
    from ..data.images import decode_label_png, load_image
    from ..inference import Segmenter
    from ..models.ovseg import build_model
    from ..outputs import palette

    world = config.path("world")
    classes = read_class_names(f"{world}/classes/all.json")
    colours = palette(len(classes))
    segmenters = {row: Segmenter(build_model(models[row][0], weights=models[row][1])) for row in ("pretrained", "ft-mpt")}
    names = sorted(os.listdir(f"{world}/eval/images"))[: config.figure_images]
    rows = []
    for name in names:
        image = load_image(f"{world}/eval/images/{name}")
        truth = decode_label_png(storage.read_bytes(f"{world}/eval/labels/{name[:-4]}.png")).astype(np.int64)
        maps = [truth, *(s.segment(image, classes).labels for s in segmenters.values())]
        tiles = [image] + [(image * 0.4 + colours[m] * 0.6).astype(np.uint8) for m in maps]
        height = max(t.shape[0] for t in tiles)
        rows.append(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255)
                                    for t in tiles], axis=1))
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    header = np.full((18, sheet.shape[1], 3), 255, np.uint8)
    step = sheet.shape[1] // 4
    for index, text in enumerate(("image", "ground truth", "pretrained CLIP", "FT then MPT")):
        cv2.putText(header, text, (index * step + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    from ..data.images import encode_png

    storage.write_bytes(path, encode_png(np.concatenate([header, sheet])))


def write_report(config, models: dict[str, tuple[str, str]], results: dict[str, dict], timings: dict) -> dict:
    from .reproduce import _flags

    text = tables(config, results)
    minutes = sum(v for k, v in timings.items() if not k.startswith("total")) / 60
    text += (f"\nSteps' wall time on this machine: {minutes:.1f} minutes in all "
             f"({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if not k.startswith('total'))}).\n"
             "\n![held-out images under the pretrained CLIP and FT then MPT](figure.png)\n")
    storage.write_text(config.path("results.md"), text)
    numbers = {row: dict(zip(("all", "seen", "unseen"), _scores(r))) for row, r in results.items()}
    summary = {"seed": config.seed, "config": config.model_dump(), "mIoU": numbers, "timings": timings,
               "models": {row: {"config": c, "weights": w} for row, (c, w) in models.items()}}
    storage.write_text(config.path("results.json"), json.dumps(summary, indent=1))
    figure(config, models, config.path("figure.png"))
    card = ["# The `tiny` preset's shipped weights", "",
            "Trained by the small-scale reproduction (`ovseg-ray reproduce`), every stage on the synthetic open "
            f"world of seed {config.seed} (`ovseg-ray synth --world open`): a CLIP pretrained on its images and "
            "captions (the web corpus `world/web` where `clip_images` > 0), the MaskFormer trained on its 52 seen classes with that CLIP's text embeddings, pairs mined "
            "from its captions, then FT and MPT of the CLIP on them (the row 'FT, then MPT' below).", "",
            "```", "ovseg-ray reproduce " + " ".join(_flags(**config.model_dump())),
            "```", "", "Its numbers, on held-out images of that world (mIoU %, all / seen / unseen):", "",
            text.split("## Table 3", 1)[1].split("## Table 2", 1)[0].strip().split("\n", 1)[1], "",
            "It knows only the open world's 72 classes (`ovseg_ray/data/world.py`): it segments the synthetic "
            "scenes, not photographs."]
    storage.write_text(config.path("model_card.md"), "\n".join(card) + "\n")
    return summary
