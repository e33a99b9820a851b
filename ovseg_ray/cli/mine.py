"""``ovseg-ray mine``: mine (masked region, noun) training pairs from a COCO captions dataset on Ray Data.

    ovseg-ray mine --config mining.yaml [--proposals.max-actors 8 --captions-per-image 5 ...]

Every config field is also a flag. Re-running the same command after a crash finishes the missing
shards only. Connects to the Ray cluster of ``ray job submit`` (RAY_ADDRESS) or starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys

from ..config import config_from_args
from ..mining.config import MiningConfig
from .common import add_config_command, refuse_relative_paths_in_job


def register(subparsers) -> None:
    add_config_command(subparsers, "mine", "mine (masked region, noun) training pairs on Ray Data", __doc__,
                       MiningConfig, run, ray_address=True)


def run(args: argparse.Namespace) -> int:
    from ..data.pair_store import OutputLayout
    from ..mining.nouns import load_nltk_resources
    from ..mining.pipeline import InjectedFailure, MiningInterrupted, mine_pairs
    from ..raycluster import init_ray

    config = config_from_args(args, MiningConfig)
    refuse_relative_paths_in_job({"output": config.output})
    OutputLayout(config.output).check_output()  # before Ray starts, like the nltk check below
    load_nltk_resources()  # a missing nltk resource is reported before Ray starts
    init_ray(args.address)
    try:
        result = mine_pairs(config)
    except InjectedFailure as exc:
        print(f"error: {exc}; re-run the same command to finish the remaining shards", file=sys.stderr)
        return 1
    except MiningInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the pipeline started: nothing of this run was committed
        print(f"interrupted before mining started; nothing was written by this run to {config.output}",
              file=sys.stderr)
        return 130
    print(result.summary_line())
    return 0
