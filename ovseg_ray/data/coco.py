"""A COCO captions dataset (local path or s3://) read with pycocotools, split into shards of image ids.

Shards are deterministic: image ids sorted ascending (after ``max_images``), cut into runs of
``shard_size``. The same dataset and settings always give the same shards, which is what lets a
re-run of mining skip the shards that are already written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pycocotools.coco import COCO

from . import storage


@dataclass(frozen=True)
class CaptionedImage:
    image_id: int
    uri: str
    captions: tuple[str, ...]  # in annotation id order, at most ``captions_per_image``


@dataclass(frozen=True)
class Shard:
    index: int
    images: tuple[CaptionedImage, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def image_ids(self) -> list[int]:
        return [image.image_id for image in self.images]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class CocoCaptions:
    """Images and captions of a COCO ``captions_*.json`` plus the folder holding the images."""

    def __init__(self, images: str, captions: str, captions_per_image: int | None = 1,
                 max_images: int | None = None):
        if captions_per_image is not None and captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        # Local roots become absolute: the URIs are written into the pairs and read elsewhere later.
        self.images_root = str(images) if storage.is_remote(str(images)) else os.path.abspath(str(images))
        coco = load_coco(captions)  # not kept: the driver holds only the images used
        ids = sorted(coco.imgs)
        if max_images is not None:
            ids = ids[:max_images]
        self.images: list[CaptionedImage] = []
        for image_id in ids:
            info = coco.imgs[image_id]
            if "file_name" not in info:
                raise ValueError(f"{captions}: image {image_id} has no file_name")
            anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])
            texts = tuple(t for t in (str(a.get("caption", "")).strip() for a in anns) if t)
            if captions_per_image is not None:
                texts = texts[:captions_per_image]
            self.images.append(CaptionedImage(
                image_id=int(image_id),
                uri=storage.join(self.images_root, info["file_name"]),
                captions=texts,
            ))

    def __len__(self) -> int:
        return len(self.images)

    def shards(self, shard_size: int) -> list[Shard]:
        return make_shards(self.images, shard_size)

    def fingerprint(self) -> str:
        """Hash of the image ids and captions used: a re-run must see the same input."""
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(f"{image.image_id}\t{image.uri}\t{json.dumps(image.captions)}\n".encode())
        return digest.hexdigest()[:16]


def load_coco(captions: str) -> COCO:
    """pycocotools ``COCO`` index of a captions JSON at a local path or s3:// URI."""
    try:
        raw = storage.read_bytes(captions)
    except FileNotFoundError:
        raise FileNotFoundError(f"captions file not found: {captions}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"captions file {captions} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"captions file {captions} is not COCO captions JSON (needs 'images' and 'annotations')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def make_shards(images: Sequence[CaptionedImage], shard_size: int) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    ordered = sorted(images, key=lambda image: image.image_id)
    return [Shard(index, tuple(ordered[start:start + shard_size]))
            for index, start in enumerate(range(0, len(ordered), shard_size))]
