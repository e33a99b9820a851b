"""Readers for the five prepared zero-shot benchmarks (detectron2 / ov-seg layouts), local or ``s3://``.

Paths are relative to a dataset root (``$DETECTRON2_DATASETS``); folders, label extensions, class counts
and ignore values come from the class-list JSONs shipped in ``ovseg_ray/data/classes`` (see SOURCES.md
there)::

    ade20k_150          ADEChallengeData2016/{images,annotations_detectron2}/validation   uint8 PNG, 255 ignore
    ade20k_847          ADE20K_2021_17_01/{images,annotations}_detectron2/validation      uint16 TIFF, 65535
    pascal_context_59   VOCdevkit/VOC2010/JPEGImages + annotations_detectron2/pc59_val    uint8 PNG, 255
    pascal_context_459  VOCdevkit/VOC2010/JPEGImages + annotations_detectron2/pc459_val   uint16 TIFF, 65535
    pascal_voc_20       VOCdevkit/VOC2012/JPEGImages + annotations_detectron2/val         uint8 PNG, 255
                                                                   (background is ignore, not a class)

Label maps come back as int32 arrays with every ignore value turned into :data:`IGNORE_INDEX` (-1).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import storage
from .benchmarks import ClassList, class_list
from .images import ImageDecodeError, decode_label_png

# The five zero-shot benchmarks, in the column order of the paper's Table 1.
BENCHMARKS = ("ade20k_847", "pascal_context_459", "ade20k_150", "pascal_context_59", "pascal_voc_20")
SHORT_NAMES = {
    "ade20k_847": "A-847",
    "pascal_context_459": "PC-459",
    "ade20k_150": "A-150",
    "pascal_context_59": "PC-59",
    "pascal_voc_20": "PAS-20",
}
# Where the list of samples comes from: ADE's image folders hold exactly the split, while Pascal's
# JPEGImages hold every image of the year, so there the label folder defines the split.
_INDEX_FROM = {
    "ade20k_847": "images",
    "pascal_context_459": "labels",
    "ade20k_150": "images",
    "pascal_context_59": "labels",
    "pascal_voc_20": "labels",
}
#: Ground-truth pixels that count for no class (every benchmark's ignore value is mapped to it).
IGNORE_INDEX = -1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class BenchmarkLayout:
    benchmark: str
    num_classes: int
    ignore_label: int
    label_bits: int  # 8 (uint8 PNG) or 16 (uint16 TIFF)
    image_dir: str
    gt_dir: str
    gt_ext: str
    index_from: str  # "images" or "labels"
    image_ext: str = ".jpg"


@lru_cache(maxsize=None)
def benchmark_layout(benchmark: str) -> BenchmarkLayout:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    classes = class_list(benchmark)
    return BenchmarkLayout(
        benchmark=benchmark,
        num_classes=classes.num_classes,
        ignore_label=classes.ignore_label,
        label_bits=8 if classes.ignore_label == 255 else 16,
        image_dir=classes.image_dir,
        gt_dir=classes.gt_dir,
        gt_ext=classes.gt_ext.lstrip("."),
        index_from=_INDEX_FROM[benchmark],
    )


def custom_layout(name: str, num_classes: int, images: str, labels: str, ignore_label: int = 255,
                  label_ext: str = "png", image_ext: str = ".jpg") -> BenchmarkLayout:
    """The layout of a benchmark of one's own (ADE20K-style: an image folder and a label folder, one label
    per image, value = class index); the labels define the split. 8-bit labels when the ignore value is
    255, 16-bit otherwise."""
    return BenchmarkLayout(benchmark=name, num_classes=num_classes, ignore_label=ignore_label,
                           label_bits=8 if ignore_label <= 255 else 16, image_dir=images, gt_dir=labels,
                           gt_ext=label_ext.lstrip("."), index_from="labels",
                           image_ext=image_ext if image_ext.startswith(".") else f".{image_ext}")


@dataclass(frozen=True)
class Sample:
    stem: str
    image_uri: str
    label_uri: str


def decode_label(data: bytes, layout: BenchmarkLayout, source: str = "label map") -> np.ndarray:
    """(H, W) int32 class indices, the benchmark's ignore value mapped to :data:`IGNORE_INDEX`.

    The stored type must match the benchmark (8-bit for 255-ignore sets, 16-bit for 65535-ignore sets);
    any value that is neither a class index nor the ignore value is an error naming the values.
    """
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: the file is empty")
    raw = decode_label_png(data, source)
    kind = raw.dtype.kind
    if layout.label_bits == 8 and raw.dtype != np.uint8:
        raise ImageDecodeError(
            f"{source} is {raw.dtype} but {layout.benchmark} labels are uint8 (255 = ignore)")
    if layout.label_bits == 16 and not (kind == "u" and raw.dtype.itemsize == 2) and kind != "i":
        raise ImageDecodeError(
            f"{source} is {raw.dtype} but {layout.benchmark} labels are uint16 (65535 = ignore)")
    labels = raw.astype(np.int32)
    ignore = labels == layout.ignore_label
    bad = ~ignore & ((labels < 0) | (labels >= layout.num_classes))
    if bad.any():
        values = np.unique(labels[bad])[:10].tolist()
        raise ImageDecodeError(
            f"{source} has values outside 0..{layout.num_classes - 1} and ignore {layout.ignore_label}: {values}")
    labels[ignore] = IGNORE_INDEX
    return labels


def _stem(uri: str) -> str:
    return os.path.splitext(posixpath.basename(str(uri).rstrip("/")))[0]


class BenchmarkReader:
    """The samples and label decoding of one prepared benchmark under ``root`` (path or s3:// prefix).

    ``split_file`` (optional, one image id per line, e.g. VOC's ``ImageSets/Segmentation/val.txt``)
    fixes the split; then a missing image or label shows up as a skipped sample instead of going
    unnoticed. ``limit`` keeps the first N samples in name order (quick checks).
    """

    def __init__(self, benchmark: str, root: str, split_file: str | None = None, limit: int | None = None,
                 layout: BenchmarkLayout | None = None):
        self.layout = layout or benchmark_layout(benchmark)
        self.benchmark = benchmark
        self.root = str(root)
        self.split_file = split_file
        self.limit = limit

    @property
    def class_list(self) -> ClassList:
        return class_list(self.benchmark)

    @property
    def image_dir(self) -> str:
        return storage.join(self.root, self.layout.image_dir)

    @property
    def gt_dir(self) -> str:
        return storage.join(self.root, self.layout.gt_dir)

    def image_uri(self, stem: str, ext: str | None = None) -> str:
        return storage.join(self.image_dir, stem + (ext or self.layout.image_ext))

    def label_uri(self, stem: str) -> str:
        return storage.join(self.gt_dir, f"{stem}.{self.layout.gt_ext}")

    def _list(self, folder: str, suffixes: tuple[str, ...], what: str) -> list[str]:
        try:
            files = storage.list_files(folder, suffixes=suffixes)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.benchmark}: {what} folder not found: {folder} (expected the prepared layout "
                f"{self.layout.image_dir} + {self.layout.gt_dir} under {self.root})") from None
        if not files:
            raise ValueError(f"{self.benchmark}: no {what} files ({', '.join(suffixes)}) under {folder}")
        return files

    def samples(self) -> list[Sample]:
        """Every sample of the split, sorted by name; files are only listed here, not opened."""
        if self.split_file:
            text = storage.read_bytes(self.split_file).decode("utf-8")
            stems = [line.strip() for line in text.splitlines() if line.strip()]
            if not stems:
                raise ValueError(f"split file {self.split_file} lists no images")
            found = [Sample(s, self.image_uri(s), self.label_uri(s)) for s in dict.fromkeys(stems)]
        elif self.layout.index_from == "images":
            images = self._list(self.image_dir, IMAGE_SUFFIXES, "image")
            found = [Sample(_stem(u), u, self.label_uri(_stem(u))) for u in images]
        else:
            labels = self._list(self.gt_dir, (f".{self.layout.gt_ext}",), "label")
            found = [Sample(_stem(u), self.image_uri(_stem(u)), u) for u in labels]
        found.sort(key=lambda sample: sample.stem)
        return found[: self.limit] if self.limit else found

    def read_label(self, uri: str) -> np.ndarray:
        return decode_label(storage.read_bytes(uri), self.layout, source=uri)
