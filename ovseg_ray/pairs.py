"""The mined-pairs table: one row per (masked region, noun), shared by mining and training.

Masks travel as COCO RLE (``rle_counts`` text + ``rle_size`` [height, width]) so that any COCO tool
(pycocotools) reads them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

PAIR_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("image_uri", pa.string()),
    ("caption", pa.string()),
    ("noun", pa.string()),
    ("rle_counts", pa.string()),
    ("rle_size", pa.list_(pa.int32(), 2)),  # [height, width]
    ("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, width, height]
    ("score", pa.float32()),  # cosine similarity of noun and region
    ("proposal_index", pa.int32()),
    ("proposal_model", pa.string()),  # preset name of the MaskFormer
    ("proposal_weights", pa.string()),  # weights URI, "" for the preset's random weights
    ("clip_model", pa.string()),
    ("clip_weights", pa.string()),
])

ERROR_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("image_uri", pa.string()),
    ("stage", pa.string()),  # nouns, load, proposals, matching
    ("reason", pa.string()),
])


def encode_mask(mask: np.ndarray) -> tuple[str, list[int], list[float]]:
    """COCO RLE counts (text), size [h, w] and bbox [x, y, w, h] of a (H, W) binary mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return rle["counts"].decode("ascii"), [int(s) for s in rle["size"]], bbox


def decode_mask(counts: str, size) -> np.ndarray:
    """(H, W) bool mask from COCO RLE counts (text or bytes) and size [h, w]."""
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": counts}).astype(bool)
