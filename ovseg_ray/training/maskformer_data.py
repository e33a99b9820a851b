"""Semantic-segmentation samples for MaskFormer training (plain NumPy/PIL, no Ray).

A dataset is a folder of images and a folder of single-channel label PNGs with the same stems
(COCO-Stuff's prepared ``stuffthingmaps_detectron2/train2017`` and ``train2017``, the synthetic
dataset's ``stuffthingmaps`` and ``images``), value = class index, ``ignore_label`` = unlabelled,
local or ``s3://``. Each sample is decoded, checked (one channel, the image's size, no value beyond
the class count) and augmented with MaskFormer's semantic recipe: resize of the shorter side to a
random choice, random crop (optionally capping the share one class may fill), photometric
distortion (SSD's), horizontal flip, padding to the crop size (image 128, label ignore). A bad label
is a row with ``ok = False`` and its reason: training counts and names it, never trains on it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from ..config import StrictModel
from ..data import storage
from ..data.images import ImageDecodeError, decode_image, decode_label_png

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PAD_VALUE = 128  # MaskFormer's semantic mapper pads images with 128 (labels with the ignore value)


class AugmentConfig(StrictModel):
    """MaskFormer's semantic training augmentation (detectron2's mapper)."""

    crop_size: int = Field(0, ge=0, description="square crop side; 0 = the preset's (R101c 512, Swin-B 640)")
    min_scale: float = Field(0.5, gt=0, description="shorter side drawn from crop_size * [min_scale .. max_scale]")
    max_scale: float = Field(2.0, gt=0, description="in steps of 0.1 (MaskFormer: 0.5 .. 2.0)")
    short_sides: list[int] = Field(default_factory=list, description="explicit shorter-side choices (pixels), "
                                   "instead of the scale range")
    max_size: int = Field(4096, gt=0, description="cap on the longer side after the resize")
    single_category_max_area: float = Field(1.0, gt=0, le=1, description="largest share one class may fill "
                                             "in a crop (1.0 = no cap, as the OVSeg configs)")
    color_jitter: bool = Field(True, description="SSD's photometric distortion (COLOR_AUG_SSD)")
    flip: bool = Field(True, description="random horizontal flip")

    def short_side_choices(self) -> list[int]:
        if self.short_sides:
            return list(self.short_sides)
        steps = range(round(self.min_scale * 10), round(self.max_scale * 10) + 1)
        return [max(1, int(step * 0.1 * self.crop_size)) for step in steps]


@dataclass(frozen=True)
class Sample:
    image_uri: str
    label_uri: str


def list_samples(root: str, images: str, labels: str) -> list[Sample]:
    """Every label PNG under ``root/labels`` paired with the image of the same stem under ``root/images``.

    A label without an image is refused here, naming it (the dataset is incomplete).
    """
    image_dir, label_dir = storage.join(root, images), storage.join(root, labels)
    label_files = storage.list_files(label_dir, suffixes=(".png",))
    by_stem = {os.path.splitext(os.path.basename(u))[0]: u
               for u in storage.list_files(image_dir, suffixes=IMAGE_EXTENSIONS)}
    samples, missing = [], []
    for label in label_files:
        stem = os.path.splitext(os.path.basename(label))[0]
        if stem in by_stem:
            samples.append(Sample(by_stem[stem], label))
        else:
            missing.append(label)
    if missing:
        raise FileNotFoundError(f"{len(missing)} label(s) under {label_dir} have no image under {image_dir}, "
                                f"e.g. {missing[0]}")
    if not samples:
        raise FileNotFoundError(f"no label PNGs under {label_dir}")
    return samples


def checked_label(data: bytes, source: str, image_shape: tuple[int, int], num_classes: int,
                  ignore_label: int) -> np.ndarray:
    """The label map as int64, or ValueError naming the file: RGB instead of indices, another size than
    its image, or values beyond the class count (other than ``ignore_label``)."""
    try:
        label = decode_label_png(data, source)
    except ImageDecodeError as exc:
        raise ValueError(str(exc).replace("must be a single-channel label map", "is not a label map of class "
                                          "indices (one channel)")) from None
    if label.shape != tuple(image_shape):
        raise ValueError(f"label {source} is {label.shape[1]}x{label.shape[0]} but its image is "
                         f"{image_shape[1]}x{image_shape[0]}")
    label = label.astype(np.int64)
    bad = np.unique(label[(label >= num_classes) & (label != ignore_label)])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise ValueError(f"label {source} has values {shown} beyond the {num_classes} classes "
                         f"(ignore value {ignore_label})")
    return label


def _resize(image: np.ndarray, label: np.ndarray, short: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    height, width = label.shape
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    size = (max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
    return image, label


def _crop(image: np.ndarray, label: np.ndarray, crop: int, max_area: float, ignore: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random crop (smaller sides kept whole); with ``max_area`` < 1, up to 10 tries for a crop whose
    largest class fills less than that share of its labelled pixels (detectron2's rule)."""
    height, width = label.shape
    ch, cw = min(crop, height), min(crop, width)
    for _ in range(10):
        y0, x0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
        window = label[y0:y0 + ch, x0:x0 + cw]
        if max_area >= 1.0:
            break
        counts = np.unique(window[window != ignore], return_counts=True)[1]
        if len(counts) > 1 and counts.max() < max_area * counts.sum():
            break
    return image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SSD's colour augmentation: brightness (+-32), contrast (0.5-1.5) before or after saturation
    (0.5-1.5) and hue (+-18 degrees), each applied with probability 1/2."""
    out = image.astype(np.float32)

    def contrast(x):
        return x * rng.uniform(0.5, 1.5) if rng.random() < 0.5 else x

    if rng.random() < 0.5:
        out = out + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        out = contrast(out)
    hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
    if rng.random() < 0.5:
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
    if rng.random() < 0.5:
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-18, 19)) // 2) % 180  # OpenCV hue is degrees / 2
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if not contrast_first:
        out = contrast(out)
    return np.clip(out, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, label: np.ndarray, config: AugmentConfig, ignore: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(3, S, S) float32 image (0-255, padding 128) and (S, S) int64 label (padding ``ignore``), S = crop."""
    short = int(rng.choice(config.short_side_choices()))
    image, label = _resize(image, label, short, config.max_size)
    image, label = _crop(image, label, config.crop_size, config.single_category_max_area, ignore, rng)
    if config.color_jitter:
        image = photometric_distortion(image, rng)
    if config.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    crop = config.crop_size
    padded_image = np.full((crop, crop, 3), PAD_VALUE, np.float32)
    padded_label = np.full((crop, crop), ignore, np.int64)
    padded_image[: image.shape[0], : image.shape[1]] = image
    padded_label[: label.shape[0], : label.shape[1]] = label
    return np.ascontiguousarray(padded_image.transpose(2, 0, 1)), padded_label


def load_batch(batch: dict, num_classes: int, ignore_label: int, augmentation: dict, seed: int | None) -> dict:
    """Ray Data ``map_batches`` (numpy): read, check and augment each (image_uri, label_uri) row.

    Returns ``image`` (N, 3, S, S) float32, ``label`` (N, S, S) int64, ``ok``, ``error``, ``label_uri``.
    ``seed`` None draws fresh augmentations on every pass; a number makes each row's deterministic.
    """
    config = AugmentConfig.model_validate(augmentation)
    crop = config.crop_size
    count = len(batch["label_uri"])
    images = np.full((count, 3, crop, crop), PAD_VALUE, np.float32)
    labels = np.full((count, crop, crop), ignore_label, np.int64)
    ok, errors = np.zeros(count, bool), [""] * count
    for row in range(count):
        image_uri, label_uri = str(batch["image_uri"][row]), str(batch["label_uri"][row])
        key = None if seed is None else [seed, zlib.crc32(label_uri.encode())]
        rng = np.random.default_rng(key)
        try:
            image = decode_image(storage.read_bytes(image_uri), source=image_uri)
            label = checked_label(storage.read_bytes(label_uri), label_uri, image.shape[:2], num_classes, ignore_label)
        except (OSError, ValueError) as exc:
            errors[row] = str(exc)
            continue
        images[row], labels[row] = augment(image, label, config, ignore_label, rng)
        ok[row] = True
    return {"image": images, "label": labels, "ok": ok, "error": np.array(errors, dtype=object),
            "label_uri": np.array([str(u) for u in batch["label_uri"]], dtype=object)}
