"""``ovseg-ray segment-batch``: segment every image under a folder or s3:// prefix on a Ray actor pool.

Per image it writes the same files as ``ovseg-ray segment`` (STEM.labels.png, STEM.overlay.png,
STEM.json), plus index.parquet (URI, classes present, pixel fractions, RLEs) and errors.parquet
(unreadable images and why). A re-run skips images already written. Example:
``ovseg-ray segment-batch --input s3://bucket/photos --classes "sky,grass,dog" --out s3://bucket/seg
--compute.max-actors 4``.
"""

from __future__ import annotations

import argparse

from ..config import config_from_args
from .common import add_config_command, refuse_relative_paths_in_job


def register(subparsers) -> None:
    from ..evaluation.batch_segment import SegmentBatchConfig

    add_config_command(subparsers, "segment-batch", "segment a folder or s3:// prefix of images on Ray", __doc__,
                       SegmentBatchConfig, run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.batch_segment import SegmentBatchConfig
    from ..evaluation.engine import run_segment_batch

    config = config_from_args(args, SegmentBatchConfig)
    refuse_relative_paths_in_job({"out": config.out})
    summary = run_segment_batch(config)
    return 1 if summary["errors"] and not (summary["segmented"] or summary["existing"]) else 0
