"""Mined pairs -> training data for open_clip's own scripts (plain Python, no Ray).

Each pair becomes its **masked crop**: the image cut to the mask's tight box, the pixels outside
the mask set to CLIP's mean colour (the region crop of ``models/regions.py``, before CLIP's own
resize, which open_clip's transforms then apply), as a JPEG, with the noun as its caption.

* **WebDataset**: ``OUT/webdataset/shard-00000.tar`` ... with ``{key}.jpg``, ``{key}.txt`` (the
  noun) and ``{key}.json`` (noun, caption, image id and URI, score and the quality signals), for
  ``open_clip_train --dataset-type webdataset``.
* **CSV**: ``OUT/csv/crops/{key}.jpg`` and ``OUT/csv/train.csv`` (tab-separated ``filepath`` and
  ``title``: open_clip's ``--dataset-type csv`` defaults), for ``--train-data OUT/csv/train.csv``.

Pairs flagged as duplicates of a compound on the same mask (``duplicate_of``) are left out unless
``keep_duplicates``. Pair files are read one at a time and each image is read once per file.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ..data import storage
from ..data.images import load_image
from ..data.pair_store import pair_files
from ..data.pairs import decode_mask
from ..models.clip import CLIP_MEAN
from ..models.regions import mask_boxes

FILL = tuple(int(round(255 * c)) for c in CLIP_MEAN)
FORMATS = ("webdataset", "csv")


@dataclass
class ExportResult:
    pairs: int
    skipped: int  # duplicates left out, pairs whose image could not be read
    shards: list[str]
    csv: str | None

    def summary_line(self, out: str) -> str:
        return (f"exported {self.pairs} masked crops ({self.skipped} pairs left out) as {len(self.shards)} "
                f"WebDataset shards{' and ' + self.csv if self.csv else ''} -> {out}")


def masked_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8: the mask's tight box of ``image``, outside-mask pixels in CLIP's mean colour."""
    boxes, valid = mask_boxes(torch.from_numpy(mask)[None])
    if not bool(valid[0]):
        raise ValueError("empty mask")
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = FILL
    return crop


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _crops(pairs_uri: str, keep_duplicates: bool, skipped: list[int]) -> Iterator[tuple[str, bytes, dict]]:
    """(key, JPEG, metadata) of every exported pair, file by file."""
    for file in pair_files(pairs_uri):
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as handle:
            rows = pq.read_table(handle).to_pylist()
        images: dict[str, np.ndarray | None] = {}
        per_image: dict[int, int] = {}
        for row in rows:
            if row.get("duplicate_of") and not keep_duplicates:
                skipped[0] += 1
                continue
            uri = row["image_uri"]
            if uri not in images:
                try:
                    images[uri] = load_image(uri)
                except (FileNotFoundError, ValueError, OSError):
                    images[uri] = None
            if images[uri] is None:
                skipped[0] += 1
                continue
            crop = masked_crop(images[uri], decode_mask(row["rle_counts"], row["rle_size"]))
            number = per_image[row["image_id"]] = per_image.get(row["image_id"], -1) + 1
            key = f"{row['image_id']:012d}-{number:03d}"  # the pair's place among its image's pairs
            meta = {name: row.get(name) for name in ("noun", "caption", "image_id", "image_uri", "score",
                                                     "area_fraction", "score_margin", "objectness",
                                                     "caption_index", "bbox")}
            yield key, _jpeg(crop), meta


def _tar(members: list[tuple[str, bytes, dict]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key, jpeg, meta in members:
            for suffix, data in (("jpg", jpeg), ("txt", meta["noun"].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def export_pairs(pairs_uri: str, out: str, pairs_per_shard: int = 1000, formats: tuple[str, ...] = FORMATS,
                 keep_duplicates: bool = False) -> ExportResult:
    """Write the masked crops of the pairs under ``pairs_uri`` (a mining output, its pairs/ or a Parquet
    file) as WebDataset shards and/or open_clip's CSV form under ``out`` (a folder or s3:// prefix)."""
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {sorted(unknown) or formats}; choose from {', '.join(FORMATS)}")
    if pairs_per_shard < 1:
        raise ValueError(f"pairs_per_shard must be at least 1, got {pairs_per_shard}")
    fs, path = storage.filesystem(out)
    if fs.exists(path) and fs.isfile(path):
        raise ValueError(f"output {out} is an existing file; give a folder (or s3:// prefix)")
    skipped, shards, pending, lines, count = [0], [], [], ["filepath\ttitle"], 0

    def flush() -> None:
        if pending:
            shards.append(storage.join(out, "webdataset", f"shard-{len(shards):05d}.tar"))
            storage.write_bytes(shards[-1], _tar(pending))
            pending.clear()

    for key, jpeg, meta in _crops(pairs_uri, keep_duplicates, skipped):
        count += 1
        if "webdataset" in formats:
            pending.append((key, jpeg, meta))
            if len(pending) >= pairs_per_shard:
                flush()
        if "csv" in formats:
            root = out if storage.is_remote(out) else os.path.abspath(out)  # open_clip reads the paths as given
            crop_uri = storage.join(root, "csv", "crops", f"{key}.jpg")
            storage.write_bytes(crop_uri, jpeg)
            lines.append(f"{crop_uri}\t{meta['noun']}")
    flush()
    csv = None
    if "csv" in formats:
        csv = storage.join(out, "csv", "train.csv")
        storage.write_text(csv, "\n".join(lines) + "\n")
    return ExportResult(count, skipped[0], shards, csv)
