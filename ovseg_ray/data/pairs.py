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
    # Quality signals (ovseg_ray.mining.quality); training reads none of them.
    ("area_fraction", pa.float32()),  # mask pixels / image pixels
    ("score_margin", pa.float32()),  # score minus the noun's second-best proposal's; null with one region
    ("objectness", pa.float32()),  # the proposal's MaskFormer objectness (1 - p(no object))
    ("caption_index", pa.int32()),  # which of the image's captions the noun came from
    ("duplicate_of", pa.string()),  # the compound this head noun duplicates on the same mask, else ""
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


def rle_total_pixels(counts: str) -> int:
    """Sum of the runs of a COCO compressed RLE string; raises ValueError if it is malformed.

    pycocotools decodes malformed strings without complaint (into garbage), so pairs are checked.
    """
    runs: list[int] = []
    position = 0
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("RLE counts end in the middle of a number")
            code = data[position] - 48
            if not 0 <= code < 64:
                raise ValueError(f"RLE counts contain an invalid character {chr(data[position])!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("RLE counts contain a negative run")
        runs.append(value)
    return sum(runs)


def decode_mask(counts: str | bytes, size, validate: bool = True) -> np.ndarray:
    """(H, W) bool mask from COCO RLE counts (text or bytes) and size [h, w].

    Malformed input (bad size, empty or corrupt counts, runs that do not cover h x w pixels) raises
    ValueError: pycocotools would otherwise decode it into garbage without complaint. ``validate=False``
    skips the (pure Python, as slow as decoding) run check, for RLE this process's pipeline just encoded.
    """
    if size is None or len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"invalid RLE size {None if size is None else list(size)}")
    if not counts:
        raise ValueError("empty RLE counts")
    height, width = int(size[0]), int(size[1])
    total = rle_total_pixels(counts) if validate else height * width
    if total != height * width:
        raise ValueError(f"RLE covers {total} pixels but its size is {height}x{width}")
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)
