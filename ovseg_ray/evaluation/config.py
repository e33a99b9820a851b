"""What the inference engines share: the actor pool's config and the per-image task protocol."""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa
from pydantic import Field

from ..config import ActorPoolConfig


class ComputeConfig(ActorPoolConfig):
    """The inference actor pool, plus the tasks that read files ahead of it."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per inference actor (fractions allowed)")
    fetch_num_cpus: float = Field(0.25, gt=0, description="CPUs per task that reads files ahead of the actors")


class ImageTask(Protocol):
    """Per-image work run inside :class:`SegmenterActor`; must be picklable."""

    output_schema: pa.Schema

    def process(self, segmenter: Any, row: dict) -> list[dict]:
        """Rows (matching ``output_schema``) for one input row; per-image errors become rows too."""
