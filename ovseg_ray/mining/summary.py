"""A mining run's outcome (plain Python, no Ray): totals from the shard markers, this run's speed and
the earlier runs' speed, the summary line, and the two ways a run stops early."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..data import storage
from ..data.pair_store import OutputLayout


class InjectedFailure(RuntimeError):
    """Raised by ``fail_after_shards``: simulates a crash part-way through a run."""


class MiningInterrupted(Exception):
    """Ctrl-C during a run: what was committed, and that the same command resumes."""

    def __init__(self, committed: int, total: int, this_run: int, output: str):
        self.committed, self.total, self.this_run, self.output = committed, total, this_run, output
        super().__init__(f"interrupted: {committed} of {total} shards are committed in {output} ({this_run} by "
                         f"this run); re-run the same command to mine the other {total - committed}")


@dataclass
class MiningResult:
    summary: dict[str, Any]
    stats: str = ""  # Ray Data's stats of this run ("" when every shard was already done)
    shards_written: list[int] = field(default_factory=list)

    def summary_line(self) -> str:
        s, run = self.summary, self.summary["this_run"]
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_reason"].items())) or "none"
        return (f"mined {s['pairs']} pairs ({s['unique_nouns']} unique nouns) from {s['images_with_pairs']} of "
                f"{s['images_in']} images in {s['shards']} shards ({s['shards_skipped']} already done) in "
                f"{run['wall_time_s']:.1f}s ({run['images_per_s']:.2f} images/s); {s['errors']} errors ({errors}) "
                f"-> {s['output']}")


@dataclass
class RunProgress:
    started: float = field(default_factory=time.perf_counter)
    written: list[int] = field(default_factory=list)
    processed: int = 0
    first_output: float | None = None  # perf_counter of the first batch out of the pipeline
    first_batch_rows: int = 0
    last_output: float | None = None

    def batch_out(self, images: int) -> None:
        self.last_output = time.perf_counter()
        if self.first_output is None:
            self.first_output, self.first_batch_rows = self.last_output, images
        self.processed += images

    def steady_rate(self) -> float | None:
        """Images/s after the first batch came out (start-up excluded), if more batches followed."""
        if self.first_output is None or self.last_output <= self.first_output:
            return None
        return (self.processed - self.first_batch_rows) / (self.last_output - self.first_output)

    def speed(self, wall_time: float) -> dict[str, Any]:
        """This run's record: images mined, shards written, wall time and rates."""
        record = {"images_processed": self.processed, "shards_written": len(self.written),
                  "wall_time_s": round(wall_time, 3),
                  "images_per_s": round(self.processed / wall_time, 3) if wall_time > 0 else 0.0,
                  "startup_s": None, "steady_images_per_s": None}
        if self.first_output is not None:
            # Start-up (models loading in the actors) vs the rate once images flow: what a long run sees.
            record["startup_s"] = round(self.first_output - self.started, 3)
            steady = self.steady_rate()
            record["steady_images_per_s"] = None if steady is None else round(steady, 3)
        return record


def marker_totals(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over committed shards, from their markers alone (the pairs are never read back)."""
    by_reason: Counter = Counter()
    nouns: set[str] = set()
    for marker in markers:
        by_reason.update(marker.get("errors_by_reason", {}))
        nouns.update(marker.get("nouns", []))
    return {
        "images": sum(m.get("images", 0) for m in markers),
        "images_with_pairs": sum(m.get("images_with_pairs", 0) for m in markers),
        "pairs": sum(m.get("pairs", 0) for m in markers),
        "unique_nouns": len(nouns),
        "errors": sum(m.get("errors", 0) for m in markers),
        "errors_by_reason": dict(sorted(by_reason.items())),
    }


def summarize(layout: OutputLayout, images_in: int | None, num_shards: int, skipped: int,
              progress: RunProgress, wall_time: float) -> dict[str, Any]:
    """Totals over every committed shard, this run's speed, and the speed of every earlier run that
    mined something (a no-op re-run keeps their figures). ``images_in`` is None when the input's
    size is known only from its committed shards (the file formats)."""
    markers = layout.read_markers()
    totals = marker_totals(markers)
    this_run = progress.speed(wall_time)
    runs = previous_runs(layout) + ([this_run] if progress.processed else [])
    return {
        "output": layout.root,
        "images_in": totals["images"] if images_in is None else images_in,
        "shards": num_shards,
        "shards_done": len(markers),
        "shards_skipped": skipped,
        "complete": len(markers) >= num_shards,
        "images_with_pairs": totals["images_with_pairs"],
        "pairs": totals["pairs"],
        "unique_nouns": totals["unique_nouns"],
        "errors": totals["errors"],
        "errors_by_reason": totals["errors_by_reason"],
        "this_run": this_run,
        "runs": runs,
    }


def previous_runs(layout: OutputLayout) -> list[dict[str, Any]]:
    """The per-run speed records of an earlier summary.json (none if there is none)."""
    uri = layout.path("summary.json")
    if not storage.exists(uri):
        return []
    try:
        runs = json.loads(storage.read_bytes(uri)).get("runs", [])
    except (ValueError, AttributeError):
        return []  # an unreadable old summary loses only its speed history: the totals are recounted
    return [run for run in runs if isinstance(run, dict)]
