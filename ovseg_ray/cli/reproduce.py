"""``ovseg-ray reproduce``: the paper at small scale, every stage trained on the synthetic open world.

    ovseg-ray reproduce --out runs/reproduce --seed 0          # ~30 minutes on 2 CPU cores
    ovseg-ray reproduce --config reproduce.yaml --seed 1       # another world instance, same classes

Runs, each with the project's own command: synth --world open, pretrain-clip, train-maskformer (seen
classes), mine (1 caption per image), train-clip (MPT, FT, FT then MPT on the mined pairs; FT on the
seen GT masks), eval (each row on the held-out split, seen / unseen mIoU; the oracle analysis), then
writes OUT/results.md (Tables 2 and 3 and the oracle rows), results.json, figure.png and
model_card.md. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse

from ..config import config_from_args
from ..workflows.reproduce import ReproduceConfig
from .common import add_config_command, refuse_relative_paths_in_job


def register(subparsers) -> None:
    add_config_command(subparsers, "reproduce", "the paper at small scale on the synthetic open world", __doc__,
                       ReproduceConfig, run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.reproduce import reproduce

    config = config_from_args(args, ReproduceConfig)
    refuse_relative_paths_in_job({"out": config.out})
    reproduce(config)
    return 0
