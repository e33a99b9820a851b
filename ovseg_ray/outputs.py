"""What a segmentation produces: a label PNG, a colour overlay with a legend, and a JSON with RLEs.

Shared by ``ovseg-ray segment``, batch segmentation and the HTTP service.
"""

from __future__ import annotations

import colorsys
import json
from typing import TYPE_CHECKING

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .data import storage
from .data.images import encode_png

if TYPE_CHECKING:  # type only: writing outputs needs no torch
    from .inference import SegmentationResult

OUTPUT_KINDS = ("label_png", "overlay_png", "rle")


def palette(num_classes: int) -> np.ndarray:
    """(N, 3) uint8 colours, well spread in hue and stable for a given class index."""
    colours = []
    for index in range(num_classes):
        hue = (index * 0.618033988749895) % 1.0
        lightness = 0.45 + 0.1 * ((index // 7) % 3)
        colours.append([int(255 * c) for c in colorsys.hls_to_rgb(hue, lightness, 0.75)])
    return np.array(colours, dtype=np.uint8).reshape(-1, 3)


#: Label map value of an unlabelled pixel (only the demo inference leaves any): the type's largest value.
UNLABELLED_VALUE = {np.uint8: 255, np.uint16: 65535}


def compact_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The label map as uint8 (up to 256 classes) or uint16 (up to 65536): what a label PNG stores.

    Unlabelled pixels (-1) become the type's largest value, which then no class may use (255 / 65535).
    """
    if num_classes > 65536:
        raise ValueError(f"{num_classes} classes do not fit a 16-bit label map (at most 65536)")
    unlabelled = labels < 0
    dtype = np.uint8 if num_classes <= (255 if unlabelled.any() else 256) else np.uint16
    if not unlabelled.any():
        return labels.astype(dtype, copy=False)
    if num_classes >= 65536:
        raise ValueError("65536 classes leave no 16-bit value for unlabelled pixels")
    compact = labels.astype(dtype)
    compact[unlabelled] = UNLABELLED_VALUE[dtype]
    return compact


def expand_labels(compact: np.ndarray, num_classes: int) -> np.ndarray:
    """The inverse of :func:`compact_labels`: int32 class indices, -1 where unlabelled."""
    labels = compact.astype(np.int32)
    top = UNLABELLED_VALUE[compact.dtype.type]
    if num_classes <= top:  # the largest value is no class index, so it marks unlabelled pixels
        labels[compact == top] = -1
    return labels


def label_png(labels: np.ndarray, num_classes: int) -> bytes:
    """Class index per pixel: 8-bit PNG up to 256 classes, 16-bit beyond."""
    return encode_png(compact_labels(labels, num_classes))


def overlay_png(image: np.ndarray, labels: np.ndarray, classes: list[str], alpha: float = 0.55) -> bytes:
    """The image blended with class colours, with a legend of the classes present on the right."""
    colours = palette(len(classes))
    labelled = labels >= 0  # unlabelled pixels (demo inference) keep the image's own colour
    blended = image.astype(np.float32) * (1 - alpha) + colours[np.where(labelled, labels, 0)].astype(np.float32) * alpha
    blended = np.where(labelled[..., None], blended, image.astype(np.float32)).astype(np.uint8)
    present = [int(i) for i in np.unique(labels) if i >= 0]
    row_height, pad = 18, 6
    text_width = max((cv2.getTextSize(classes[i][:40], cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0] for i in present),
                     default=0)
    legend_width = text_width + 3 * pad + 14
    height = max(image.shape[0], pad + row_height * len(present))
    canvas = np.full((height, image.shape[1] + legend_width, 3), 255, np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = blended
    x = image.shape[1] + pad
    for row, index in enumerate(present):
        y = pad + row * row_height
        canvas[y : y + 12, x : x + 14] = colours[index]
        cv2.putText(canvas, classes[index][:40], (x + 14 + pad, y + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return encode_png(canvas)


def class_rles(labels: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """COCO RLE (``size``, ``counts`` as text) for every class present in ``labels``."""
    rles = {}
    for index in np.unique(labels[labels >= 0]):
        rle = mask_utils.encode(np.asfortranarray((labels == index).astype(np.uint8)))
        rles[classes[int(index)]] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return rles


def result_summary(result: SegmentationResult, with_rle: bool = True, with_timings: bool = False) -> dict:
    """JSON-ready description: class list, per-class pixel fractions, RLEs of the classes present.

    Timings are left out by default so that the same input always gives the same file.
    """
    summary = {
        "classes": result.classes,
        "height": int(result.labels.shape[0]),
        "width": int(result.labels.shape[1]),
        "pixel_fractions": result.pixel_fractions(),
        "unlabelled_fraction": result.unlabelled_fraction(),
        "num_proposals": result.num_proposals,
        "num_valid_regions": result.num_valid_regions,
    }
    if with_timings:
        summary["timings"] = {k: round(v, 6) for k, v in result.timings.items()}
    if with_rle:
        summary["rle"] = class_rles(result.labels, result.classes)
    return summary


def claim_stems(items) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """``(uri, stem)`` pairs in order: those that keep their stem, and ``(uri, stem, reason)`` for each
    whose stem an earlier one took (its outputs would overwrite the earlier's). Segment and
    segment-batch both follow this rule."""
    owners: dict[str, str] = {}
    kept, refused = [], []
    for uri, stem in items:
        if stem in owners:
            refused.append((uri, stem, f"outputs would overwrite those of {owners[stem]} (same name)"))
        else:
            owners[stem] = uri
            kept.append((uri, stem))
    return kept, refused


#: The files written per image, by kind; ``json`` is written last (it marks the image as done).
OUTPUT_SUFFIXES = {"label_png": ".labels.png", "overlay_png": ".overlay.png", "json": ".json"}


def segmentation_paths(out_dir: str, stem: str) -> dict[str, str]:
    """Where :func:`write_segmentation` puts each kind of output of ``stem``."""
    return {kind: storage.join(out_dir, stem + suffix) for kind, suffix in OUTPUT_SUFFIXES.items()}


def write_segmentation(out_dir: str, stem: str, image: np.ndarray, result: SegmentationResult) -> dict[str, str]:
    """Write ``STEM.labels.png``, ``STEM.overlay.png`` and ``STEM.json`` under ``out_dir`` (path or s3://)."""
    paths = segmentation_paths(out_dir, stem)
    storage.write_bytes(paths["label_png"], label_png(result.labels, len(result.classes)))
    storage.write_bytes(paths["overlay_png"], overlay_png(image, result.labels, result.classes))
    storage.write_text(paths["json"], json.dumps(result_summary(result), indent=1))
    return paths
