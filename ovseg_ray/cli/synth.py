"""``ovseg-ray synth``: write the synthetic COCO-format dataset."""

from __future__ import annotations

import argparse
import json
import tempfile


def register(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="generate a small synthetic COCO-format dataset",
                                   description=__doc__)
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--images", type=int, default=16, help="number of COCO images (default 16)")
    parser.add_argument("--eval-images", type=int, default=None,
                        help="images in the ADE20K-layout evaluation split (default images // 4, at least 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Writes locally; for an s3:// --out, into a temporary folder that is then uploaded."""
    from ..data import storage
    from ..data.synth import generate_dataset

    storage.check_output_folder(args.out)
    if not storage.is_remote(args.out):
        summary = generate_dataset(args.out, images=args.images, seed=args.seed, eval_images=args.eval_images)
    else:
        with tempfile.TemporaryDirectory(prefix="ovseg-synth-") as local:
            summary = generate_dataset(local, images=args.images, seed=args.seed, eval_images=args.eval_images)
            summary["files"] = len(storage.upload_folder(local, args.out))
        summary["out"] = args.out
    print(json.dumps(summary))
    return 0
