"""Pair mining as a Ray job: the same config and flags as ``ovseg-ray mine``.

    ray job submit --working-dir . -- python jobs/mine_pairs.py --config cluster/mining.yaml

Inside ``ray job submit`` it joins that cluster (RAY_ADDRESS); run directly, it starts a local Ray.
Re-submitting the same command after a failure finishes the missing shards only.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["mine", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
