"""Mined pairs to training batches (plain PyTorch/NumPy, no Ray): masked, cropped, resized regions.

Every region goes through THE shared ``RegionPreprocessor`` (as in mining and serving), with its
pixel mask kept so the mask prompts see it. Rows that cannot be used are kept with a reason.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..data import storage
from ..data.images import load_image
from ..inference import image_to_tensor, resize_image
from ..models.ovseg import OVSegConfig
from ..models.regions import RegionPreprocessor
from ..models.text import MAX_NAME_CHARS
from ..data.pairs import decode_mask

REQUIRED_PAIR_COLUMNS = ("image_uri", "noun", "rle_counts", "rle_size")



def noun_problem(noun: str) -> str | None:
    """Why a (stripped) noun cannot be trained on, or None: the rule the vocabulary follows too."""
    if not noun:
        return "empty noun"
    if len(noun) > MAX_NAME_CHARS:
        return f"noun longer than {MAX_NAME_CHARS} characters"
    return None


def checked_mask(counts, size) -> np.ndarray:
    """Decode one pair's mask (``decode_mask`` refuses malformed RLE), refusing empty masks too."""
    mask = decode_mask(counts, size)
    if not mask.any():
        raise ValueError("the mask is empty")
    return mask


def decode_pairs(batch: dict, size: int, interpolation: str = "bicubic") -> dict:
    """Turn a batch of pair rows into masked, cropped, resized regions (Ray Data ``map_batches``).

    Each image is read once per batch; all its masks go through THE shared ``RegionPreprocessor``.
    A mask whose size differs from the image's refers to the image resized to that size (mining
    records proposals at the MaskFormer's processing size). Rows that cannot be used (missing or
    corrupt image, malformed RLE, empty mask or noun) are kept with ``ok = False`` and the reason
    in ``error`` so that training can count and report them instead of failing.

    Returns columns ``region`` (N, 3, S, S) float32, ``mask`` (N, 1, S, S) uint8, ``noun``, ``ok``,
    ``error`` and ``image_uri``.
    """
    preprocess = RegionPreprocessor(size=size, interpolation=interpolation)
    count = len(batch["image_uri"])
    regions = np.zeros((count, 3, size, size), np.float32)
    masks = np.zeros((count, 1, size, size), np.uint8)
    ok = np.zeros(count, bool)
    errors = [""] * count
    nouns = [str(n).strip() if n is not None else "" for n in batch["noun"]]
    by_image: dict[str, list[int]] = {}
    for row, uri in enumerate(batch["image_uri"]):
        by_image.setdefault(str(uri), []).append(row)
    for uri, rows in by_image.items():
        try:
            image = load_image(uri)
        except (OSError, ValueError) as exc:
            for row in rows:
                errors[row] = f"image: {exc}"
            continue
        by_size: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for row in rows:
            problem = noun_problem(nouns[row])
            if problem:
                errors[row] = problem
                continue
            try:
                mask = checked_mask(batch["rle_counts"][row], batch["rle_size"][row])
            except ValueError as exc:
                errors[row] = f"mask: {exc}"
                continue
            by_size.setdefault(mask.shape, []).append((row, mask))
        for mask_size, items in by_size.items():
            source = image_to_tensor(resize_image(image, mask_size))
            stacked = torch.from_numpy(np.stack([mask for _, mask in items]))
            out = preprocess(source, stacked)
            for index, (row, _) in enumerate(items):  # every mask is non-empty, so all are valid
                regions[row] = out.images[index].numpy()
                masks[row] = out.masks[index].numpy().astype(np.uint8)
                ok[row] = True
    return {
        "region": regions, "mask": masks, "noun": np.array(nouns, dtype=object), "ok": ok,
        "error": np.array(errors, dtype=object),
        "image_uri": np.array([str(u) for u in batch["image_uri"]], dtype=object),
    }


def coco_instance_pairs(dataset_root: str, annotations: str = "annotations/instances.json",
                        images: str = "images"):
    """Pairs from ground truth: every COCO instance mask with its category name as the noun.

    The paper's ground-truth-mask baseline, and a way to train without mining. Polygons and
    uncompressed RLE are converted to compressed RLE. Returns a ``PAIR_SCHEMA`` pyarrow Table.
    """
    import pyarrow as pa
    from pycocotools import mask as mask_utils

    from ..data.pairs import PAIR_SCHEMA

    data = json.loads(storage.read_bytes(storage.join(dataset_root, annotations)))
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_id = {image["id"]: image for image in data["images"]}
    rows = []
    for index, ann in enumerate(data["annotations"]):
        image = by_id[ann["image_id"]]
        height, width = int(image["height"]), int(image["width"])
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        rows.append({
            "image_id": int(ann["image_id"]), "image_uri": storage.join(dataset_root, images, image["file_name"]),
            "caption": "", "noun": names[ann["category_id"]], "rle_counts": counts, "rle_size": [height, width],
            "bbox": [float(v) for v in ann["bbox"]], "score": 1.0, "proposal_index": index,
            "proposal_model": "ground-truth", "proposal_weights": "", "clip_model": "", "clip_weights": "",
        })
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def region_size(config: OVSegConfig) -> int:
    """The CLIP input size of a model config, without building the model."""
    import open_clip

    from ..models.clip import register_clip_configs

    register_clip_configs()
    vision = open_clip.get_model_config(config.clip_arch)["vision_cfg"]
    image_size = vision.get("image_size", 224)
    return int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)


def batch_tensors(batch: dict, noun_index: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The usable rows of a decoded batch as (regions, masks, noun ids) tensors on the CPU."""
    ok = np.asarray(batch["ok"], bool)
    ids = [noun_index.get(str(n), -1) for n in np.asarray(batch["noun"])[ok]]
    known = np.array(ids, np.int64) >= 0
    keep = np.flatnonzero(ok)[known]
    regions = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["region"])[keep]))
    masks = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["mask"])[keep]))
    return regions, masks, torch.tensor(np.array(ids, np.int64)[known])
