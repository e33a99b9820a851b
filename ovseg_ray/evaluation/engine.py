"""The evaluation package's Ray module: the Ray Data inference stage shared by ``ovseg-ray eval`` and
``ovseg-ray segment-batch``, and the two drivers on top of it (their logic lives in ``benchmark.py``
and ``batch_segment.py``).

Two operators::

    rows with URIs --fetch (CPU tasks: read the files' bytes ahead)--> --SegmenterActor (actor pool)-->

:class:`SegmenterActor` holds one :class:`~ovseg_ray.inference.Segmenter` per actor
(``ActorPoolStrategy(min_size, max_size)``, ``num_gpus`` per actor from
:func:`ovseg_ray.raycluster.resolve_num_gpus`, fractional ``num_cpus`` allowed). What it does with each
image is an :class:`ImageTask` (evaluation: confusion matrices; batch segmentation: output files), so
the model loading, batching and resource handling exist once.
"""

from __future__ import annotations

from collections import Counter
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import ModelConfig
from ..data import storage
from ..raycluster import init_ray, items_dataset
from .batch_segment import (
    ERROR_SCHEMA,
    INDEX_COLUMNS,
    INDEX_SCHEMA,
    RESULT_SCHEMA,
    ParquetSink,
    SegmentBatchConfig,
    SegmentTask,
    check_run_record,
    error_row,
    existing_rows,
    finished_stems,
    list_inputs,
    resolve_classes,
)
from .benchmark import (
    EvalAccumulator,
    EvalConfig,
    benchmark_inputs,
    benchmark_result,
    check_seen_classes,
    report_line,
)
from .config import ComputeConfig, ImageTask


def fetch_files(batch: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """For each URI column ``c``, add ``c_bytes`` (the file, or null) and ``c_error`` ("" when read)."""
    rows = batch.to_pylist()
    for row in rows:
        for column in columns:
            data, error = None, ""
            try:
                data = storage.read_bytes(row[column])
            except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
                error = str(exc)
            except OSError as exc:
                error = f"cannot read {row[column]}: {exc}"
            row[f"{column}_bytes"], row[f"{column}_error"] = data, error
    fields = list(batch.schema)
    for column in columns:
        fields += [pa.field(f"{column}_bytes", pa.binary()), pa.field(f"{column}_error", pa.string())]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


class SegmenterActor:
    """A Ray Data callable class: builds the model once, then runs ``task`` on every row."""

    def __init__(self, model: ModelConfig, task: ImageTask):
        from ..raycluster import worker_device
        from ..inference import Segmenter

        self.segmenter = Segmenter.from_config(model, device=worker_device(model.device))
        self.task = task

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The task's rows for the batch: in one go where the task batches its images (``process_batch``)."""
        rows = batch.to_pylist()
        if hasattr(self.task, "process_batch"):
            out = self.task.process_batch(self.segmenter, rows)
        else:
            out = [result for row in rows for result in self.task.process(self.segmenter, row)]
        return pa.Table.from_pylist(out, schema=self.task.output_schema)


def inference_stage(items: list[dict], model: ModelConfig, compute: ComputeConfig, task: ImageTask,
                    fetch: tuple[str, ...]):
    """A dataset of the task's rows for ``items`` (dicts holding the URI columns named in ``fetch``).

    The pool never starts more actors than there are blocks (each would build a model for nothing).
    """
    import ray

    from ..raycluster import check_capacity, resolve_num_gpus

    num_gpus = resolve_num_gpus(compute.num_gpus)
    ds = items_dataset(items, compute.batch_size)
    max_actors = min(compute.max_actors, ds.num_blocks())
    min_actors = min(compute.min_actors, max_actors)
    check_capacity(
        min_actors * compute.num_cpus + compute.fetch_num_cpus, min_actors * num_gpus,
        f"{min_actors} inference actor(s) x {compute.num_cpus:g} CPU + {num_gpus:g} GPU plus a "
        f"{compute.fetch_num_cpus:g}-CPU file-reading task",
        "lower compute.num_cpus (fractions are fine), compute.min_actors or compute.fetch_num_cpus",
    )
    ds = ds.map_batches(
        fetch_files,
        fn_kwargs={"columns": tuple(fetch)},
        batch_size=compute.batch_size,
        batch_format="pyarrow",
        num_cpus=compute.fetch_num_cpus,
    )
    return ds.map_batches(
        SegmenterActor,
        fn_constructor_kwargs={"model": model, "task": task},
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        batch_size=compute.batch_size,
        batch_format="pyarrow",
        num_cpus=compute.num_cpus,
        num_gpus=num_gpus,
    )


# ----------------------------------------------------------------------------------------------
# The drivers: ``ovseg-ray eval`` and ``ovseg-ray segment-batch``


def evaluate_benchmark(config: EvalConfig, benchmark: str) -> tuple[dict, np.ndarray]:
    """Run one benchmark through the inference stage: its results dict and the (settings, N, N)
    confusion matrices (written by the caller)."""
    items, task = benchmark_inputs(config, benchmark)
    ds = inference_stage(items, config.model, config.compute, task, fetch=("label_uri", "image_uri"))
    totals = EvalAccumulator(len(task.classes), len(task.settings))
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        totals.add(batch)
    return benchmark_result(config, benchmark, task, len(items), totals), totals.matrices


def run_evaluation(config: EvalConfig) -> dict:
    """Evaluate every configured benchmark; write ``results.json``, ``table.md`` and the per-class charts."""
    from .report import write_benchmark_report, write_confusion, write_reports

    check_seen_classes(config)
    init_ray()
    results = {"name": config.display_name(), "config": config.model_dump(), "benchmarks": {}}
    for benchmark in config.benchmark_names():
        result, matrices = evaluate_benchmark(config, benchmark)
        results["benchmarks"][benchmark] = result
        write_confusion(config.out, result, matrices)
        write_benchmark_report(config.out, results["name"], result)
        write_reports(config, results)  # after each benchmark, so a later failure loses nothing
        print(report_line(benchmark, result))
    return results


def run_segment_batch(config: SegmentBatchConfig) -> dict:
    """Segment every image under ``config.input``; returns the counts and the index/errors URIs."""
    classes = resolve_classes(config)
    rows, clashes = list_inputs(config.input, config.out)
    check_run_record(config, classes)
    done = set() if config.overwrite else finished_stems(config.out)
    todo = [r for r in rows if r["stem"] not in done]
    existing = [r for r in rows if r["stem"] in done]
    print(f"segment-batch: {len(rows) + len(clashes)} images under {config.input}: {len(todo)} to segment, "
          f"{len(existing)} already done; {len(classes)} classes")

    init_ray()
    batches = [pa.Table.from_pylist(
        [error_row(c["image_uri"], c["stem"], c["reason"]) for c in clashes], schema=RESULT_SCHEMA)]
    if existing:
        ds = items_dataset(existing, 64).map_batches(
            existing_rows, fn_kwargs={"out": config.out}, batch_format="pyarrow",
            num_cpus=config.compute.fetch_num_cpus)
        batches = chain(batches, ds.iter_batches(batch_format="pyarrow", batch_size=None))
    if todo:
        task = SegmentTask(config.out, classes, config.ensemble_lambda, config.mask_threshold, config.mode)
        ds = inference_stage(todo, config.model, config.compute, task, fetch=("image_uri",))
        batches = chain(batches, ds.iter_batches(batch_format="pyarrow", batch_size=None))

    index = ParquetSink(storage.join(config.out, "index.parquet"), INDEX_SCHEMA)
    errors = ParquetSink(storage.join(config.out, "errors.parquet"), ERROR_SCHEMA)
    statuses: Counter[str] = Counter()
    try:
        for batch in batches:
            batch = batch.cast(RESULT_SCHEMA)
            failed = pc.equal(batch.column("status"), "error")
            failures = batch.filter(failed)
            index.write(batch.filter(pc.invert(failed)).select(INDEX_COLUMNS))
            errors.write(failures.select(ERROR_SCHEMA.names))
            statuses.update(batch.column("status").to_pylist())
            for item in failures.select(["image_uri", "reason"]).to_pylist():
                print(f"error: {item['image_uri']}: {item['reason']}")
    finally:
        index.close()
        errors.close()
    summary = {
        "images": len(rows) + len(clashes),
        "segmented": statuses["segmented"],
        "existing": statuses["existing"],
        "errors": statuses["error"],
        "index": index.uri,
        "errors_file": errors.uri,
    }
    print(f"segment-batch: {summary['segmented']} segmented, {summary['existing']} already done, "
          f"{summary['errors']} failed, of {summary['images']} images -> {config.out} (index.parquet"
          f"{', errors.parquet' if summary['errors'] else ''})")
    return summary
