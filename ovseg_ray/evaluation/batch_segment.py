"""Batch segmentation of a folder or ``s3://`` prefix on the shared Ray Data inference stage.

For every image under the input it writes what ``ovseg-ray segment`` writes (``STEM.labels.png``,
``STEM.overlay.png``, ``STEM.json``, with STEM the path below the input without its extension), then::

    OUT/index.parquet      one row per segmented image: URI, classes present, pixel fractions, RLEs
    OUT/errors.parquet     one row per image that could not be read or segmented, with the reason
    OUT/run.yaml           the settings of the run (a re-run with other settings is refused)

A re-run skips images whose three output files exist (``STEM.json`` is written last) and rebuilds the
index from their JSON, so an interrupted run resumes where it stopped. ``--overwrite`` with other
settings first withdraws every ``STEM.json`` of the old settings, so that even if it is interrupted,
no output of the old settings is ever taken for finished by a later run.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import Field, model_validator

from ..data import storage
from .config import ComputeConfig
from ..config import ModelConfig, StrictModel
from ..data.images import ImageDecodeError, decode_image
from ..device import is_device_failure
from ..outputs import OUTPUT_SUFFIXES, claim_stems, result_summary, segmentation_paths, write_segmentation

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
RUN_FILE = "run.yaml"  # not .json: no image output can be named like it

RESULT_SCHEMA = pa.schema([
    ("image_uri", pa.string()),
    ("stem", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("classes", pa.list_(pa.string())),  # classes present, largest first
    ("pixel_fractions", pa.list_(pa.float64())),  # aligned with classes
    ("rle_counts", pa.list_(pa.string())),  # COCO RLE counts of each class present, size [height, width]
    ("json_uri", pa.string()),
    ("label_png_uri", pa.string()),
    ("overlay_png_uri", pa.string()),
    ("status", pa.string()),  # segmented | existing | error
    ("reason", pa.string()),
])
INDEX_COLUMNS = [name for name in RESULT_SCHEMA.names if name not in ("status", "reason")] + ["status"]
INDEX_SCHEMA = pa.schema([RESULT_SCHEMA.field(name) for name in INDEX_COLUMNS])
ERROR_SCHEMA = pa.schema([("image_uri", pa.string()), ("stem", pa.string()), ("reason", pa.string())])


class SegmentBatchConfig(StrictModel):
    input: str = Field(description="folder or s3:// prefix of images (searched recursively), or one image")
    out: str = Field(description="output folder or s3:// prefix")
    classes: list[str] = Field(default_factory=list, description='class names, e.g. "sky,grass,red circle"')
    classes_file: str | None = Field(None, description="file (path or s3://) with one class name per line")
    model: ModelConfig = ModelConfig()
    compute: ComputeConfig = ComputeConfig()
    ensemble_lambda: float | None = Field(None, ge=0, le=1, description="CLIP weight (default: the preset's)")
    mask_threshold: float | None = Field(None, gt=0, lt=1, description="default: the preset's (0.35 in demo mode)")
    mode: Literal["eval", "demo"] = Field("eval", description="eval: the official evaluation inference; demo: "
                                          "the official demo's (CLIP only, uncovered pixels unlabelled)")
    overwrite: bool = Field(False, description="segment every image again instead of skipping finished ones")

    @model_validator(mode="after")
    def _one_class_source(self) -> SegmentBatchConfig:
        if self.mode == "demo" and self.ensemble_lambda is not None:
            raise ValueError("ensemble_lambda does not apply in mode demo (the demo inference is CLIP only)")
        if self.classes and self.classes_file:
            raise ValueError("give either classes or classes_file, not both")
        if not self.classes and not self.classes_file:
            raise ValueError("no classes given: set classes or classes_file")
        return self


def resolve_classes(config: SegmentBatchConfig) -> list[str]:
    """The vocabulary, each name once (the rule of ``segment`` and the service), also after demo mode
    appends "others" to a single name."""
    from ..inference import vocabulary
    from ..models.text import distinct_class_names, read_class_file

    classes = read_class_file(config.classes_file) if config.classes_file else distinct_class_names(config.classes)
    distinct_class_names(vocabulary(classes, config.mode))
    return classes


def output_paths(out: str, stem: str) -> dict[str, str]:
    """The index columns naming the files :func:`ovseg_ray.outputs.write_segmentation` writes for ``stem``."""
    return {f"{kind}_uri": uri for kind, uri in segmentation_paths(out, stem).items()}


def _relative(uri: str, prefix: str) -> str:
    prefix = prefix.rstrip("/")
    if uri == prefix:
        return posixpath.basename(uri)
    return uri[len(prefix) + 1:] if uri.startswith(prefix + "/") else posixpath.basename(uri)


def _inside(uri: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return uri == folder or uri.startswith(folder + "/")


def _normalise(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(uri)


def list_inputs(input_uri: str, out: str) -> tuple[list[dict], list[dict]]:
    """Images under ``input_uri`` as rows ``{image_uri, stem}``, plus rows for images that would
    overwrite another image's outputs (same path, other extension). Files under ``out`` are left out."""
    storage.check_output_folder(out, "out")
    root = _normalise(input_uri)
    files = storage.list_files(root, suffixes=IMAGE_SUFFIXES)
    out_root = _normalise(out)
    if out_root.rstrip("/") == root.rstrip("/"):
        raise ValueError(f"the output folder must differ from the input folder ({input_uri})")
    skip_out = _inside(out_root, root)  # outputs inside the input: never take them for inputs
    kept, refused = claim_stems((uri, os.path.splitext(_relative(uri, root))[0]) for uri in files
                                if not (skip_out and _inside(uri, out_root)))
    rows = [{"image_uri": uri, "stem": stem} for uri, stem in kept]
    clashes = [{"image_uri": uri, "stem": stem, "reason": reason} for uri, stem, reason in refused]
    if not rows and not clashes:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {input_uri}")
    return rows, clashes


def finished_stems(out: str) -> set[str]:
    """Stems whose three output files are all present under ``out``."""
    out_root = _normalise(out)
    if not storage.exists(out_root):
        return set()
    suffixes = OUTPUT_SUFFIXES.values()
    present = {_relative(uri, out_root) for uri in storage.list_files(out_root, suffixes=suffixes)}
    marker = OUTPUT_SUFFIXES["json"]
    stems = {p[: -len(marker)] for p in present if p.endswith(marker)}
    return {s for s in stems if all(s + suffix in present for suffix in suffixes)}


def result_row(image_uri: str, stem: str, out: str, summary: dict, status: str) -> dict:
    """An index row from a segmentation summary (:func:`ovseg_ray.outputs.result_summary`)."""
    present = sorted(((f, c) for c, f in summary["pixel_fractions"].items() if f > 0), key=lambda x: -x[0])
    return {
        "image_uri": image_uri, "stem": stem, "height": summary["height"], "width": summary["width"],
        "classes": [c for _, c in present], "pixel_fractions": [f for f, _ in present],
        "rle_counts": [summary["rle"][c]["counts"] for _, c in present],
        **output_paths(out, stem), "status": status, "reason": "",
    }


def error_row(image_uri: str, stem: str, reason: str) -> dict:
    return {"image_uri": image_uri, "stem": stem, "height": 0, "width": 0, "classes": [], "pixel_fractions": [],
            "rle_counts": [], "json_uri": "", "label_png_uri": "", "overlay_png_uri": "",
            "status": "error", "reason": reason}


@dataclass
class SegmentTask:
    """Per batch: decode, :meth:`Segmenter.segment_many`, write each image's ``segment`` outputs and index row."""

    out: str
    classes: list[str]
    lam: float | None
    mask_threshold: float | None
    mode: str = "eval"
    output_schema = RESULT_SCHEMA

    def process(self, segmenter, row: dict) -> list[dict]:
        return self.process_batch(segmenter, [row])

    def process_batch(self, segmenter, rows: list[dict]) -> list[dict]:
        """The index rows of a batch: its readable images segmented together (:meth:`Segmenter.segment_many`);
        if that fails on an input, each image alone, so that only the bad one becomes an error row."""
        out: list[list[dict]] = [[] for _ in rows]
        ready = []  # (position, image) of the rows that decoded
        for position, row in enumerate(rows):
            if row["image_uri_error"]:
                out[position] = [error_row(row["image_uri"], row["stem"], row["image_uri_error"])]
                continue
            try:
                ready.append((position, decode_image(row["image_uri_bytes"], source=row["image_uri"])))
            except ImageDecodeError as exc:
                out[position] = [error_row(row["image_uri"], row["stem"], str(exc))]
        results = self._segment([image for _, image in ready], segmenter) if len(ready) > 1 else None
        for n, (position, image) in enumerate(ready):
            row = rows[position]
            result = results[n] if results else self._segment([image], segmenter)
            if isinstance(result, list):
                result = result[0]
            if isinstance(result, str):
                out[position] = [error_row(row["image_uri"], row["stem"], result)]
                continue
            try:
                write_segmentation(self.out, row["stem"], image, result)
            except OSError as exc:  # e.g. a full disk or a refused S3 write: record it, go on
                out[position] = [error_row(row["image_uri"], row["stem"], f"cannot write outputs: {exc}")]
                continue
            out[position] = [result_row(row["image_uri"], row["stem"], self.out, result_summary(result), "segmented")]
        return [item for items in out for item in items]

    def _segment(self, images: list, segmenter):
        """The results of ``images``, or for an input the model cannot take, the reason (a string);
        a failure of the GPU is raised (a re-run picks the images up)."""
        options = {"lam": self.lam, "mask_threshold": self.mask_threshold, "mode": self.mode}
        try:
            if len(images) == 1:  # one image: Segmenter.segment (the same computation)
                return [segmenter.segment(images[0], self.classes, **options)]
            return segmenter.segment_many(images, self.classes, **options)
        except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. an image the model cannot take
            if is_device_failure(exc):
                raise
            return None if len(images) > 1 else f"segmentation failed: {type(exc).__name__}: {exc}"


def existing_rows(batch: pa.Table, out: str) -> pa.Table:
    """Index rows of images finished by an earlier run, read back from their ``STEM.json``."""
    rows = []
    for row in batch.to_pylist():
        try:
            summary = json.loads(storage.read_bytes(output_paths(out, row["stem"])["json_uri"]))
            rows.append(result_row(row["image_uri"], row["stem"], out, summary, "existing"))
        except (OSError, ValueError, KeyError) as exc:
            rows.append(error_row(row["image_uri"], row["stem"],
                                  f"existing output unreadable (delete it to segment again): {exc}"))
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _run_record(config: SegmentBatchConfig, classes: list[str]) -> dict:
    return {"classes": classes, "model": config.model.model_dump(exclude={"device", "max_regions_per_forward"}),
            "ensemble_lambda": config.ensemble_lambda, "mask_threshold": config.mask_threshold, "mode": config.mode}


def check_run_record(config: SegmentBatchConfig, classes: list[str]) -> None:
    """Refuse to mix outputs of different vocabularies or models in one folder (unless overwriting)."""
    uri = storage.join(config.out, RUN_FILE)
    record = _run_record(config, classes)
    previous = yaml.safe_load(storage.read_bytes(uri)) if storage.exists(uri) else None
    if previous == record:
        return
    if previous is not None and not config.overwrite:
        changed = [key for key in record if previous.get(key) != record[key]]
        raise ValueError(f"{config.out} holds outputs of a run with other settings ({', '.join(changed)} "
                         f"differ): use another --out or --overwrite true")
    if previous is not None:  # overwriting other settings: their outputs no longer count as finished
        stale = [output_paths(config.out, stem)["json_uri"] for stem in sorted(finished_stems(config.out))]
        storage.remove_files(stale)
        print(f"segment-batch: --overwrite with other settings: {len(stale)} earlier outputs withdrawn")
    storage.write_text(uri, yaml.safe_dump(record, sort_keys=False))


class ParquetSink:
    """Tables streamed into a local temporary Parquet file, copied to ``uri`` (path or s3://) on close,
    so the driver never holds the whole index."""

    def __init__(self, uri: str, schema: pa.Schema):
        self.uri = uri
        handle, self.tmp = tempfile.mkstemp(suffix=".parquet")
        os.close(handle)
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()
        try:
            fs, path = storage.filesystem(self.uri)
            fs.makedirs(posixpath.dirname(path) if storage.is_remote(self.uri) else os.path.dirname(path),
                        exist_ok=True)
            fs.put_file(self.tmp, path)
        finally:
            os.remove(self.tmp)
