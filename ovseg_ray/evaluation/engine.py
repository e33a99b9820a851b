"""The Ray Data inference stage shared by evaluation (``ovseg-ray eval``) and ``ovseg-ray segment-batch``.

Two operators::

    rows with URIs --fetch (CPU tasks: read the files' bytes ahead)--> --SegmenterActor (actor pool)-->

:class:`SegmenterActor` holds one :class:`~ovseg_ray.inference.Segmenter` per actor
(``ActorPoolStrategy(min_size, max_size)``, ``num_gpus`` per actor from
:func:`ovseg_ray.device.resolve_num_gpus`, fractional ``num_cpus`` allowed). What it does with each
image is an :class:`ImageTask` (evaluation: confusion matrices; batch segmentation: output files), so
the model loading, batching and resource handling exist once.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import pyarrow as pa
from pydantic import Field

from ..data import storage
from ..config import ActorPoolConfig, ModelConfig


class ComputeConfig(ActorPoolConfig):
    """The inference actor pool, plus the tasks that read files ahead of it."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per inference actor (fractions allowed)")
    fetch_num_cpus: float = Field(0.25, gt=0, description="CPUs per task that reads files ahead of the actors")


class ImageTask(Protocol):
    """Per-image work run inside :class:`SegmenterActor`; must be picklable."""

    output_schema: pa.Schema

    def process(self, segmenter: Any, row: dict) -> list[dict]:
        """Rows (matching ``output_schema``) for one input row; per-image errors become rows too."""


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
        from ..device import worker_device
        from ..inference import Segmenter
        from ..models.ovseg import build_model

        device = worker_device(model.device)
        self.segmenter = Segmenter(build_model(model.preset, weights=model.weights, device=device, seed=model.seed))
        self.task = task

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [out for row in batch.to_pylist() for out in self.task.process(self.segmenter, row)]
        return pa.Table.from_pylist(rows, schema=self.task.output_schema)


#: The driver puts every input block in the object store up front: cap their number on huge inputs.
MAX_INPUT_BLOCKS = 2000


def items_dataset(items: list[dict], batch_size: int):
    """A Ray dataset of ``items`` in blocks of ``batch_size`` rows, or more when that would make over
    :data:`MAX_INPUT_BLOCKS` blocks. A map stage never splits a block, so the block size bounds how
    finely work spreads over the actors."""
    import ray

    rows_per_block = max(batch_size, math.ceil(len(items) / MAX_INPUT_BLOCKS))
    return ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / rows_per_block)))


def inference_stage(items: list[dict], model: ModelConfig, compute: ComputeConfig, task: ImageTask,
                    fetch: tuple[str, ...]):
    """A dataset of the task's rows for ``items`` (dicts holding the URI columns named in ``fetch``).

    The pool never starts more actors than there are blocks (each would build a model for nothing).
    """
    import ray

    from ..device import check_capacity, resolve_num_gpus

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
