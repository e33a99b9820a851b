"""``ovseg-ray synth``: write the synthetic COCO-format dataset."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="generate a small synthetic COCO-format dataset",
                                   description=__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", type=int, default=16, help="number of COCO images (default 16)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="images in the ADE20K-layout evaluation split (default images // 4, at least 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synth import generate_dataset

    summary = generate_dataset(args.out, images=args.images, seed=args.seed, eval_images=args.eval_images)
    print(json.dumps(summary))
    return 0
