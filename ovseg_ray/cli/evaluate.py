"""``ovseg-ray eval``: zero-shot mIoU on ADE20K-150/847, Pascal Context-59/459 and VOC-20, on Ray Data.

Writes results.json, table.md (laid out like the paper's Table 1) and per-class IoU charts under --out.
Every config field can be set in the YAML given to --config or overridden by its flag, e.g.
``ovseg-ray eval --config eval.yaml --benchmarks ade20k_150,pascal_voc_20 --sweep.lambdas 0.5,0.6,0.7``.

Example eval.yaml::

    benchmarks: [ade20k_847, pascal_context_459, ade20k_150, pascal_context_59, pascal_voc_20]
    dataset_root: s3://my-bucket/detectron2_datasets     # or a local $DETECTRON2_DATASETS
    out: runs/eval/swinb
    model: {preset: swinb-vitl14, weights: s3://my-bucket/ovseg_swinb_vitL14.safetensors}
    compute: {min_actors: 1, max_actors: 8, batch_size: 4, num_gpus: 1, num_cpus: 4}
    # ensemble_lambda / mask_threshold default to the official evaluation (0.7 ADE, 0.6 Pascal Context,
    # 0.45 VOC) and the preset's threshold (models/official.py)
    sweep: {lambdas: [0.5, 0.6, 0.7, 0.8], mask_thresholds: [0.3, 0.4, 0.5]}
    seen_classes_from: coco_stuff_171                   # optional seen/unseen mIoU
"""

from __future__ import annotations

import argparse

from ..config import config_from_args
from .common import add_config_command, refuse_relative_paths_in_job


def register(subparsers) -> None:
    from ..evaluation.benchmark import EvalConfig

    add_config_command(subparsers, "eval", "zero-shot evaluation on the standard benchmarks", __doc__, EvalConfig, run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.benchmark import EvalConfig
    from ..evaluation.engine import run_evaluation

    config = config_from_args(args, EvalConfig)
    refuse_relative_paths_in_job({"out": config.out})
    results = run_evaluation(config)
    print(f"wrote {config.out}/results.json and {config.out}/table.md")
    empty = [b for b, r in results["benchmarks"].items() if r["counts"]["evaluated"] == 0]
    if empty:
        print(f"error: no image could be evaluated for {', '.join(empty)} (see 'skipped' in results.json)")
        return 1
    return 0
