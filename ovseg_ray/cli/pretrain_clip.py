"""``ovseg-ray pretrain-clip``: contrastive image-caption pretraining of a CLIP from scratch (Ray Train).

    ovseg-ray pretrain-clip --data.images world/train/images --data.captions world/train/annotations/captions.json \\
        --optim.epochs 20 --run.storage-path runs --run.name clip

The stand-in for OpenAI's CLIP where none exists: in reproductions (the tiny preset's CLIP) and for
custom domains with their own image-caption data. Both towers train on whole images and captions;
like the real CLIP it never sees a masked image. Outputs in RUN/final/: ``clip.safetensors`` (give it
as ``--clip-weights`` / ``model.clip_weights`` to segment, train-maskformer, mine, train-clip, eval)
and ``open_clip_model.safetensors`` (open_clip's own layout); ``summary.json`` has the loss and the
in-batch image-to-caption accuracy per epoch. Re-running the command resumes; a finished run is
reported, not redone.
"""

from __future__ import annotations

import argparse

from ..config import config_from_args
from ..training.pretrain import PretrainClipConfig
from .common import add_config_command, run_training


def register(subparsers) -> None:
    add_config_command(subparsers, "pretrain-clip", "pretrain a CLIP on images and captions (Ray Train)", __doc__,
                       PretrainClipConfig, run, ray_address=True)


def run(args: argparse.Namespace) -> int:
    from ..training.engine import pretrain_clip

    config = config_from_args(args, PretrainClipConfig)
    summary = run_training(args, config, pretrain_clip)
    if summary is None:
        return 1
    return 0
