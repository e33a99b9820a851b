"""Zero-shot evaluation (Table 1 of the paper) on the shared Ray Data inference stage.

Per image the actor predicts a label map for every (lambda, mask threshold) setting and turns it and
the ground truth into a sparse confusion matrix; the driver sums them per setting and computes the
metrics (:mod:`ovseg_ray.evaluation.metrics`, whose docstring states the conventions). A sweep costs one
MaskFormer pass per image, one CLIP region pass per threshold, and one fusion per lambda.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from . import metrics
from .config import ComputeConfig
from ..config import ModelConfig, StrictModel
from ..data.benchmarks import class_list, read_class_names
from ..data.images import ImageDecodeError, decode_image
from ..data.readers import BENCHMARKS, BenchmarkLayout, BenchmarkReader, custom_layout, decode_label
from ..device import batch_or_none, is_device_failure
from ..models.official import BENCHMARK_LAMBDAS, DEFAULT_LAMBDA
from ..models.ovseg import resolve_weights, shipped_weights

logger = logging.getLogger(__name__)

BenchmarkName = Literal[BENCHMARKS]  # one name of data.readers.BENCHMARKS

EVAL_ROW_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("label_uri", pa.string()),
    ("setting", pa.int32()),  # index into the run's settings; -1 for a skipped image
    ("cells", pa.list_(pa.int64())),  # flat confusion cells gt * N + pred
    ("counts", pa.list_(pa.int64())),
    ("stage", pa.string()),  # where a skipped image failed: label, image, size, model
    ("reason", pa.string()),
    ("worker", pa.string()),  # host:pid of the actor that handled the image
])


class SweepConfig(StrictModel):
    lambdas: list[float] = Field(default_factory=list, description="ensemble lambdas to try (e.g. 0.5,0.6,0.7,0.8)")
    mask_thresholds: list[float] = Field(default_factory=list, description="mask thresholds to try")

    @field_validator("lambdas")
    @classmethod
    def _lambdas_in_range(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"every lambda must be within [0, 1], got {value}")
        return values

    @field_validator("mask_thresholds")
    @classmethod
    def _thresholds_in_range(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0.0 < value < 1.0:
                raise ValueError(f"every mask threshold must be within (0, 1), got {value}")
        return values


class CustomBenchmark(StrictModel):
    """A benchmark of one's own: an image folder and a label PNG folder (ADE20K style) under dataset_root."""

    name: str = Field(min_length=1, description="its name in results.json and the table")
    classes: str | list[str] = Field(description="the label values' names: a shipped class list, a JSON file "
                                     "with a 'classes' list (path or s3://), or the names")
    images: str = Field(description="image folder under dataset_root")
    labels: str = Field(description="label folder under dataset_root; value = class index")
    ignore_label: int = Field(255, ge=0, description="label value of unlabelled pixels")
    label_ext: str = "png"
    image_ext: str = ".jpg"
    ensemble_lambda: float = Field(DEFAULT_LAMBDA, ge=0, le=1, description="its default CLIP weight")
    seen_classes: list[str] = Field(default_factory=list, description="names counted as seen in training "
                                    "(reports seen / unseen mIoU)")

    def class_names(self) -> list[str]:
        return read_class_names(self.classes)

    def layout(self) -> BenchmarkLayout:
        return custom_layout(self.name, len(self.class_names()), self.images, self.labels, self.ignore_label,
                             self.label_ext, self.image_ext)


class EvalConfig(StrictModel):
    benchmarks: list[BenchmarkName] = Field(
        default_factory=lambda: ["ade20k_150"],
        description=f"benchmarks to evaluate: {', '.join(BENCHMARKS)}")
    custom_benchmarks: list[CustomBenchmark] = Field(
        default_factory=list, description="benchmarks of one's own (any class list over an ADE20K-style layout)")
    dataset_root: str = Field(
        default_factory=lambda: os.environ.get("DETECTRON2_DATASETS", "datasets"),
        description="folder or s3:// prefix holding the prepared layouts (default $DETECTRON2_DATASETS)")
    split_files: dict[str, str] = Field(
        default_factory=dict, description="optional {benchmark: file listing the image ids of the split}")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N images of each benchmark")
    out: str = Field("runs/eval", description="output folder or s3:// prefix")
    name: str | None = Field(None, description="row name in the table (default: preset and weights)")
    model: ModelConfig = ModelConfig()
    compute: ComputeConfig = ComputeConfig()
    ensemble_lambda: float | None = Field(
        None, ge=0, le=1, description="CLIP weight; default per benchmark from the official evaluation (0.7 ADE, "
                                      "0.6 Pascal Context, 0.45 VOC)")
    mask_threshold: float | None = Field(None, gt=0, lt=1, description="default: the preset's")
    sweep: SweepConfig = SweepConfig()
    class_names: Literal["full", "clean"] = Field(
        "full", description="full: the benchmark's class strings with synonyms; clean: first synonym only")
    seen_classes: list[str] = Field(
        default_factory=list, description="class names seen in training: reports seen/unseen mIoU")
    seen_classes_from: Literal["coco_stuff_171"] | None = Field(
        None, description="take the seen classes from a training vocabulary (matching first synonyms)")
    paper_rows: bool = Field(True, description="add the paper's OVSeg rows to the table for reference")
    oracle: Literal["masks", "labels"] | None = Field(
        None, description="the paper's oracle analysis: masks = ground-truth masks classified by CLIP; labels "
                          "= MaskFormer proposals labelled with the ground-truth class they overlap best")

    @field_validator("benchmarks")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _benchmarks_named_once(self) -> EvalConfig:
        names = self.benchmark_names()
        if not names:
            raise ValueError("no benchmark to evaluate: set benchmarks or custom_benchmarks")
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names repeat: {names} (a custom benchmark needs a name of its own)")
        unknown = sorted(set(self.split_files) - set(names))
        if unknown:
            raise ValueError(f"split_files names unknown benchmark(s) {unknown}; choose from {', '.join(names)}")
        return self

    def benchmark_names(self) -> list[str]:
        """The shipped benchmarks, then the custom ones, in the order configured."""
        return [*self.benchmarks, *(c.name for c in self.custom_benchmarks)]

    def custom(self, name: str) -> CustomBenchmark | None:
        return next((c for c in self.custom_benchmarks if c.name == name), None)

    def display_name(self) -> str:
        if self.name:
            return self.name
        weights = resolve_weights(self.model.preset, self.model.weights)
        if weights and weights == shipped_weights(self.model.preset):
            weights = "shipped weights"
        else:
            weights = os.path.basename(weights.rstrip("/")) if weights else "random weights"
        return f"{self.model.preset} ({weights})"


def settings_for(config: EvalConfig, benchmark: str, preset_threshold: float) -> list[tuple[float, float]]:
    """(lambda, threshold) pairs: the configured default first, then the sweep grid (no repeats)."""
    custom = config.custom(benchmark)
    default = custom.ensemble_lambda if custom else BENCHMARK_LAMBDAS[benchmark]
    lam = default if config.ensemble_lambda is None else config.ensemble_lambda
    threshold = preset_threshold if config.mask_threshold is None else config.mask_threshold
    grid = product(config.sweep.lambdas or [lam], config.sweep.mask_thresholds or [threshold])
    return list(dict.fromkeys([(float(lam), float(threshold)), *((float(a), float(b)) for a, b in grid)]))


@dataclass
class EvalTask:
    """Per image: read the label and the image, predict every setting, emit sparse confusion matrices."""

    layout: BenchmarkLayout
    classes: list[str]
    settings: list[tuple[float, float]]
    oracle: str | None = None
    output_schema = EVAL_ROW_SCHEMA

    def predict(self, segmenter, image: np.ndarray, label: np.ndarray) -> list[np.ndarray]:
        """One label map per setting (the oracle analyses have one setting: their threshold)."""
        if self.oracle == "masks":
            return [segmenter.oracle_masks(image, label, self.classes)]
        if self.oracle == "labels":
            return [segmenter.oracle_labels(image, label, self.classes, self.settings[0][1])]
        return segmenter.segment_settings(image, self.classes, self.settings)

    def process(self, segmenter, row: dict) -> list[dict]:
        return self.process_batch(segmenter, [row])

    def process_batch(self, segmenter, rows: list[dict]) -> list[dict]:
        """The rows of a batch. Without an oracle the readable images are predicted together
        (:meth:`Segmenter.segment_settings_many`: one MaskFormer forward per padded size); if that
        fails on an input, each image alone, so that only the bad one is skipped."""
        prepared = [self._prepare(row) for row in rows]
        ready = [item for item in prepared if isinstance(item, tuple)]
        batched = None
        if len(ready) > 1 and not self.oracle:
            batched = batch_or_none(
                lambda: segmenter.segment_settings_many([image for _, image, _ in ready], self.classes, self.settings),
                len(ready), "predictions", errors=(RuntimeError, ValueError, MemoryError))
        out, n = [], 0
        for item in prepared:
            if isinstance(item, list):
                out += item
                continue
            out += self._score(segmenter, *item, batched[n] if batched else None)
            n += 1
        return out

    @staticmethod
    def _skipped(base: dict, stage: str, reason: str) -> list[dict]:
        return [{**base, "setting": -1, "cells": [], "counts": [], "stage": stage, "reason": reason}]

    def _prepare(self, row: dict) -> tuple[dict, np.ndarray, np.ndarray] | list[dict]:
        """(base row, image, label), or the skipped row when the label or the image cannot be used."""
        base = {"image_uri": row["image_uri"], "label_uri": row["label_uri"],
                "worker": f"{socket.gethostname()}:{os.getpid()}"}
        if row["label_uri_error"]:
            return self._skipped(base, "label", row["label_uri_error"])
        try:
            label = decode_label(row["label_uri_bytes"], self.layout, source=row["label_uri"])
        except ImageDecodeError as exc:
            return self._skipped(base, "label", str(exc))
        if row["image_uri_error"]:
            return self._skipped(base, "image", row["image_uri_error"])
        try:
            image = decode_image(row["image_uri_bytes"], source=row["image_uri"])
        except ImageDecodeError as exc:
            return self._skipped(base, "image", str(exc))
        if image.shape[:2] != label.shape:
            return self._skipped(base, "size", f"label {row['label_uri']} is {label.shape[1]}x{label.shape[0]} "
                                               f"but image {row['image_uri']} is {image.shape[1]}x{image.shape[0]}")
        return base, image, label

    def _score(self, segmenter, base: dict, image: np.ndarray, label: np.ndarray,
               predictions: list[np.ndarray] | None) -> list[dict]:
        """Sparse confusion cells per setting; ``predictions`` from a batch, else predicted here."""
        out = []
        try:
            for index, pred in enumerate(predictions or self.predict(segmenter, image, label)):
                cells, counts = metrics.confusion_cells(pred, label, len(self.classes))
                out.append({**base, "setting": index, "cells": cells.tolist(), "counts": counts.tolist(),
                            "stage": "", "reason": ""})
        except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. an image the model cannot take
            if is_device_failure(exc):
                raise  # the GPU's fault, not the image's: fail the run; a re-run picks it up
            logger.exception("model failed on %s", base["image_uri"])
            return self._skipped(base, "model", f"{type(exc).__name__}: {exc}")
        return out


class EvalAccumulator:
    """Sums the actors' sparse confusion matrices per setting and collects the skipped images."""

    def __init__(self, num_classes: int, num_settings: int):
        self.matrices = np.zeros((num_settings, num_classes, num_classes), dtype=np.int64)
        self.evaluated: set[str] = set()
        self.skipped: list[dict] = []
        self.workers: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            self.workers.add(row["worker"])
            if row["setting"] < 0:
                self.skipped.append({k: row[k] for k in ("image_uri", "label_uri", "stage", "reason")})
                continue
            metrics.add_cells(self.matrices[row["setting"]], row["cells"], row["counts"])
            self.evaluated.add(row["image_uri"])


def class_names_for(benchmark: str, style: str) -> list[str]:
    listed = class_list(benchmark)
    return listed.prompt_names() if style == "full" else [c.strip() for c in listed.clean_classes]


def benchmark_classes(config: EvalConfig, benchmark: str) -> list[str]:
    """The class names a benchmark is evaluated with (a custom benchmark's as given)."""
    custom = config.custom(benchmark)
    return custom.class_names() if custom else class_names_for(benchmark, config.class_names)


def _source_names(config: EvalConfig, benchmark: str) -> list[str]:
    custom = config.custom(benchmark)
    return custom.class_names() if custom else class_list(benchmark).classes


def _name_keys(name: str) -> set[str]:
    """A class name and its first synonym, lower-cased: ``"Building, edifice"`` -> both forms."""
    name = name.strip().lower()
    return {name, name.split(",")[0].strip()}


def seen_indices(config: EvalConfig, benchmark: str) -> list[int] | None:
    """Indices of the benchmark's classes counted as seen, or None when no split is configured.

    A configured name matches a class by its full string or its first synonym.
    """
    custom = config.custom(benchmark)
    own = custom.seen_classes if custom else []
    if not config.seen_classes and not config.seen_classes_from and not own:
        return None
    wanted = {key for name in [*config.seen_classes, *own] for key in _name_keys(name)}
    if config.seen_classes_from:
        wanted |= {key for name in class_list(config.seen_classes_from).clean_classes for key in _name_keys(name)}
    return [i for i, name in enumerate(_source_names(config, benchmark)) if _name_keys(name) & wanted]


def check_seen_classes(config: EvalConfig) -> None:
    """A configured seen class that names no class of any evaluated benchmark is a typo: refuse it."""
    known = {key for benchmark in config.benchmark_names() for name in _source_names(config, benchmark)
             for key in _name_keys(name)}
    unknown = [name for name in config.seen_classes if not _name_keys(name) & known]
    if unknown:
        raise ValueError(f"seen_classes: {unknown} match no class of {', '.join(config.benchmark_names())}")
    for custom in config.custom_benchmarks:
        own = {key for name in custom.class_names() for key in _name_keys(name)}
        stray = [name for name in custom.seen_classes if not _name_keys(name) & own]
        if stray:
            raise ValueError(f"custom_benchmarks {custom.name}: seen_classes {stray} are none of its classes")


def benchmark_inputs(config: EvalConfig, benchmark: str) -> tuple[list[dict], EvalTask]:
    """The images of one benchmark (``image_uri``, ``label_uri`` rows) and the task that scores them."""
    from ..models.ovseg import load_preset

    custom = config.custom(benchmark)
    reader = BenchmarkReader(benchmark, config.dataset_root, config.split_files.get(benchmark), config.limit,
                             layout=custom.layout() if custom else None)
    classes = benchmark_classes(config, benchmark)
    settings = settings_for(config, benchmark, load_preset(config.model.preset).mask_threshold)
    items = [{"image_uri": s.image_uri, "label_uri": s.label_uri} for s in reader.samples()]
    print(f"{benchmark}: {len(items)} images, {len(classes)} classes, {len(settings)} setting(s) "
          f"(lambda, mask threshold) {settings}")
    if config.oracle:
        settings = settings[:1]
    return items, EvalTask(reader.layout, classes, settings, config.oracle)


def benchmark_result(config: EvalConfig, benchmark: str, task: EvalTask, images: int,
                     totals: EvalAccumulator) -> dict:
    """The results dict of one benchmark from its summed confusion matrices (one per setting)."""
    classes, settings = task.classes, task.settings
    seen = seen_indices(config, benchmark)
    sweep = []
    for index, (lam, threshold) in enumerate(settings):
        summary = metrics.summarize(totals.matrices[index], classes, seen)
        sweep.append({"lambda": lam, "mask_threshold": threshold, **summary})
    best = max(range(len(sweep)), key=lambda i: (sweep[i]["metrics"]["mIoU"] is not None,
                                                 sweep[i]["metrics"]["mIoU"] or 0.0, -i))
    by_stage: dict[str, int] = {}
    for item in totals.skipped:
        by_stage[item["stage"]] = by_stage.get(item["stage"], 0) + 1
    matrix = totals.matrices[0]
    result = {
        "benchmark": benchmark,
        "name": benchmark if config.custom(benchmark) else class_list(benchmark).name,
        "num_classes": len(classes),
        "class_names": config.class_names,
        "model": config.model.model_dump(),
        "lambda": settings[0][0],
        "oracle": config.oracle,
        "mask_threshold": settings[0][1],
        **sweep[0],
        "convention": metrics.CONVENTION,
        "counts": {
            "images": images,
            "evaluated": len(totals.evaluated),
            "skipped": len(totals.skipped),
            "skipped_by_stage": by_stage,
            "labelled_pixels": int(matrix.sum()),
            "actors": len(totals.workers),
        },
        "skipped": totals.skipped,
        "sweep": [{"lambda": s["lambda"], "mask_threshold": s["mask_threshold"], **s["metrics"]} for s in sweep]
        if len(sweep) > 1 else [],
        "best": {"lambda": sweep[best]["lambda"], "mask_threshold": sweep[best]["mask_threshold"],
                 **sweep[best]["metrics"]} if len(sweep) > 1 else None,
    }
    return result




def report_line(benchmark: str, result: dict) -> str:
    """One line per finished benchmark: mIoU, pixel accuracy, the setting, counts, the sweep's best."""
    counts, best = result["counts"], result["best"]
    return (f"{benchmark}: mIoU {_fmt(result['metrics']['mIoU'])} pAcc {_fmt(result['metrics']['pAcc'])} "
            f"(lambda {result['lambda']}, threshold {result['mask_threshold']}) over {counts['evaluated']} of "
            f"{counts['images']} images, {counts['skipped']} skipped"
            + (f"; best of sweep: mIoU {_fmt(best['mIoU'])} at lambda {best['lambda']}, "
               f"threshold {best['mask_threshold']}" if best else ""))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
