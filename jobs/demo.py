"""The embedded default, end to end: generate the synthetic dataset, then segment some of its images.

    python jobs/demo.py --out runs/demo

Uses the ``tiny`` preset, whose weights are random: it exercises the whole system, not accuracy.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from ovseg_ray.cli import main as cli

DEMO_CLASSES = "sky,wall,grass,water,sand,road,floor,ball,car,boat,bottle,clock,kite,star"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = os.path.join(args.out, "data")
    status = cli(["synth", "--out", data, "--images", str(args.images), "--seed", str(args.seed)])
    if status:
        return status
    images = sorted(glob.glob(os.path.join(data, "images", "*.jpg")))[:4]
    status = cli(["segment", *images, "--classes", DEMO_CLASSES, "--preset", "tiny",
                  "--out", os.path.join(args.out, "segment")])
    if status == 0:
        print(f"demo finished: dataset in {data}, segmentations in {os.path.join(args.out, 'segment')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
