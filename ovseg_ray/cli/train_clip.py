"""``ovseg-ray train-clip``: adapt the masked CLIP to mined (region, noun) pairs with Ray Train.

    ovseg-ray train-clip --config train_clip.yaml [--mode ft --optim.epochs 5 --run.num-workers 8 ...]

Modes: ``ft`` (whole image tower), ``mpt`` (mask prompts only; CLIP unchanged), ``ft-mpt`` (prompts
only, from an ft run's ``final/model.safetensors`` given as ``--model.init-weights``). Every config
field is also a flag. Checkpoints go to RUN.STORAGE_PATH/RUN.NAME; re-running the same command
resumes from the latest one, and a finished run is reported, not started again. Outputs in
RUN/final/: ``model.safetensors`` (for ``segment --weights``), ``open_clip_model.safetensors``
(plain ``open_clip.create_model(arch, pretrained=PATH)``; for the tiny preset's ``ovseg-tiny-vit``
call ``ovseg_ray.models.clip.register_clip_configs()`` first), ``mask_prompts.safetensors`` and
``summary.json`` (per-epoch loss, accuracy, samples/s). Connects to the Ray cluster of
``ray job submit`` (RAY_ADDRESS) or starts a local Ray.
"""

from __future__ import annotations

import argparse

from ..config import config_from_args
from ..training.clip_config import TrainClipConfig
from .common import add_config_command, run_training


def register(subparsers) -> None:
    add_config_command(subparsers, "train-clip", "fine-tune the masked CLIP on mined pairs (Ray Train)", __doc__,
                       TrainClipConfig, run, ray_address=True)


def run(args: argparse.Namespace) -> int:
    from ..training.engine import train_clip

    config = config_from_args(args, TrainClipConfig)
    summary = run_training(args, config, train_clip)
    if summary is None:
        return 1
    return 0
