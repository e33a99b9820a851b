"""``ovseg-ray synth``: write a synthetic dataset.

``--world small`` (default): a few classes in the COCO / COCO-Stuff / ADE20K layouts, for quick checks.
``--world open``: the open world of the small-scale reproduction (72 classes, 52 seen and 20 unseen,
true captions; see ``ovseg_ray.data.world``), with a held-out evaluation split of every class.
"""

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
    parser.add_argument("--web-images", type=int, default=0,
                        help="open world only: images of its CLIP pretraining corpus (OUT/web; default 0 = none)")
    parser.add_argument("--world", choices=("small", "open"), default="small",
                        help="small: the quick-check dataset; open: the reproduction's open world")
    parser.set_defaults(func=run)


def _write(args: argparse.Namespace, out: str) -> dict:
    if args.web_images < 0 or (args.web_images and args.world != "open"):
        raise ValueError(f"--web-images {args.web_images}: a count >= 0, and only with --world open")
    if args.world == "open":
        from ..data.world_dataset import write_world

        return write_world(out, images=args.images, eval_images=args.eval_images or 200, seed=args.seed,
                           web_images=args.web_images)
    from ..data.synth import generate_dataset

    return generate_dataset(out, images=args.images, seed=args.seed, eval_images=args.eval_images)


def run(args: argparse.Namespace) -> int:
    """Writes locally; for an s3:// --out, into a temporary folder that is then uploaded."""
    from ..data import storage

    storage.check_output_folder(args.out)
    if not storage.is_remote(args.out):
        summary = _write(args, args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="ovseg-synth-") as local:
            summary = _write(args, local)
            summary["files"] = len(storage.upload_folder(local, args.out))
        summary["out"] = args.out
    print(json.dumps(summary))
    return 0
