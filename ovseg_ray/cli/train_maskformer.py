"""``ovseg-ray train-maskformer``: train the open-vocabulary MaskFormer on semantic labels with Ray Train.

    ovseg-ray train-maskformer --config train_maskformer.yaml [--optim.max-steps 120000 --run.num-workers 8 ...]

The MaskFormer's query classifier is the cosine with the frozen CLIP text embeddings of the class
names (the preset's CLIP, or ``--model.clip-weights``: inference must use the same CLIP). Data: an
image folder and a label PNG folder under ``--data.root`` (local or s3://), e.g. COCO-Stuff-171's
prepared ``coco/train2017`` + ``coco/stuffthingmaps_detectron2/train2017``, or the synthetic
dataset's ``images`` + ``stuffthingmaps``. Checkpoints every ``optim.checkpoint_every_steps`` under
RUN.STORAGE_PATH/RUN.NAME; re-running the same command resumes, a finished run is reported, not
redone. Outputs in RUN/final/: ``maskformer.safetensors`` (the MaskFormer alone: ``segment
--weights`` it with ``--clip-weights`` of the CLIP it learnt from, or use it as mining's proposal
model), ``model.safetensors`` (the whole model with that CLIP), ``model_config.json``,
``summary.json``. With ``data.val_images``/``data.val_labels`` the run ends with the project's own
evaluation of that split (MaskFormer only, lambda 0) in RUN/final/validation/.
"""

from __future__ import annotations

import argparse
import json

from ..config import config_from_args
from ..training.maskformer_config import TrainMaskFormerConfig
from .common import add_config_command, run_training


def register(subparsers) -> None:
    add_config_command(subparsers, "train-maskformer", "train the open-vocabulary MaskFormer (Ray Train)", __doc__,
                       TrainMaskFormerConfig, run, ray_address=True)


def validate(config: TrainMaskFormerConfig, summary: dict) -> dict:
    """Evaluate the trained model on the validation split (MaskFormer only), as ``ovseg-ray eval`` does."""
    from ..data import storage
    from ..evaluation.benchmark import CustomBenchmark, EvalConfig
    from ..evaluation.engine import run_evaluation

    out = storage.join(summary["run"], "final", "validation")
    benchmark = CustomBenchmark(name="validation", classes=config.data.classes, images=config.data.val_images,
                                labels=config.data.val_labels, ignore_label=config.data.ignore_label,
                                ensemble_lambda=0.0)
    eval_config = EvalConfig(benchmarks=[], custom_benchmarks=[benchmark], dataset_root=config.data.root, out=out,
                             name=f"{config.run.name} (MaskFormer only)", paper_rows=False,
                             model={"preset": config.model.preset, "weights": summary["outputs"]["model"]},
                             compute={"num_cpus": min(1.0, config.run.cpus_per_worker)})
    result = run_evaluation(eval_config)["benchmarks"]["validation"]
    return {"mIoU": result["metrics"]["mIoU"], "pAcc": result["metrics"]["pAcc"],
            "images": result["counts"]["evaluated"], "results": storage.join(out, "results.json")}


def run(args: argparse.Namespace) -> int:
    from ..data import storage
    from ..training.engine import train_maskformer

    config = config_from_args(args, TrainMaskFormerConfig)
    summary = run_training(args, config, train_maskformer)
    if summary is None:
        return 1
    if config.data.val_images and "validation" not in summary:
        summary["validation"] = validate(config, summary)
        summary.pop("already_finished", None)
        storage.write_text(storage.join(summary["run"], "final", "summary.json"), json.dumps(summary, indent=2))
        print(f"validation: mIoU {summary['validation']['mIoU']:.2f} over {summary['validation']['images']} images "
              f"(MaskFormer only) -> {summary['validation']['results']}")
    return 0
