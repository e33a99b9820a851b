"""What every trainer's run shares, in plain Python: its folder, its record, resume, and the loop's
collective-safe iteration and crash switch (no Ray here: the session passes Ray's calls in).

``STORAGE/NAME/`` (a path or ``s3://`` prefix) holds Ray Train's checkpoints, the run record (the
settings a resumed run must share with the command that re-runs it) and, once finished,
``final/`` whose ``summary.json`` is written last: a finished run is reported, not redone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from pydantic import Field, field_validator

from ..config import ConfigError, StrictModel, settings_changes
from ..data import storage

logger = logging.getLogger(__name__)
FINAL_DIR = "final"
FAULT_DIR = "fault_injection"
SUMMARY_FILE = "summary.json"  # written last: the run is finished when it exists


class TrainSession(Protocol):
    """What a per-worker training loop needs from its runner (Ray Train, in ``engine.py``)."""

    rank: int
    world: int
    device: Any  # torch.device

    def shard(self, name: str) -> Any:
        """This worker's part of dataset ``name`` (``iter_batches`` like a Ray Data iterator)."""

    def latest_checkpoint(self) -> AbstractContextManager[str | None]:
        """The latest reported checkpoint as a local directory (None: a fresh start)."""

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | None = None, name: str | None = None) -> None:
        """Report metrics (a barrier across workers), with rank 0's checkpoint directory if any."""

    def wrap(self, module: Any) -> Any:
        """The module prepared for data-parallel training (DDP) on this worker's device."""

    def wait_for_checkpoints(self) -> None:
        """Block until every checkpoint reported so far is committed to storage."""


class RunSection(StrictModel):
    storage_path: str = Field("runs/train", description="checkpoints and outputs (path or s3://)")
    name: str = Field("run", min_length=1, description="run name: STORAGE/NAME holds the run")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto = one GPU per worker if the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0)
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1, description="worker failures retried from the last checkpoint (-1 = always)")
    log_every_steps: int = Field(50, ge=0, description="rank 0 logs a progress line every N steps (0 = per "
                                 "epoch only)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or value in (".", ".."):
            raise ValueError("must be a plain name (no '/')")
        return value


def run_dir(storage_path: str, name: str) -> str:
    """``STORAGE/NAME``, local paths made absolute."""
    base = storage_path if storage.is_remote(storage_path) else os.path.abspath(storage_path)
    return storage.join(base, name)


def check_run_record(directory: str, record_name: str, fingerprint: dict, config: dict) -> None:
    """Record the run's settings on first start; refuse to resume a run with other settings."""
    record = storage.join(directory, record_name)
    if storage.exists(record):
        previous = json.loads(storage.read_bytes(record))
        changed = settings_changes(previous.get("fingerprint", {}), fingerprint)
        if changed:
            raise ConfigError(f"run {directory} was started with other settings ({'; '.join(changed)}); "
                              f"resume it with the same settings or choose another run.name")
        return
    storage.write_text(record, json.dumps({"fingerprint": fingerprint, "config": config}, indent=2))


def read_summary(directory: str) -> dict | None:
    """``final/summary.json`` of a finished run, else None."""
    path = storage.join(directory, FINAL_DIR, SUMMARY_FILE)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def lockstep(iterator: Iterable, device) -> Iterator:
    """Yield batches while every rank still has one, so collectives always pair up across ranks."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    iterator = iter(iterator)
    while True:
        batch = next(iterator, None)
        if distributed:
            flag = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag) == 0:
                return
        elif batch is None:
            return
        yield batch


def maybe_crash(directory: str, what: str, at: int | None, crash_rank: int, now: int, rank: int,
                wait_for_checkpoints: Callable[[], None]) -> None:
    """Testing aid: exit this worker abruptly, once per run, when ``now == at`` on ``crash_rank``.

    It dies only once every checkpoint reported so far is committed, so that the retry resumes from
    the last one deterministically (a report in flight when a worker dies is dropped).
    """
    if at != now or crash_rank != rank:
        return
    marker = storage.join(directory, FAULT_DIR, f"{what}-{now}-rank-{rank}")
    if storage.exists(marker):
        return
    wait_for_checkpoints()
    storage.write_text(marker, f"injected crash at {what} {now} on rank {rank}, {time.ctime()}\n")
    logger.warning("[rank %d] fault injection: exiting abruptly at %s %d", rank, what, now)
    os._exit(1)
