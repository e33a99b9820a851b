"""``ovseg-ray mine-preview``: a contact sheet PNG of random mined pairs (masked crop, noun, score)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("mine-preview", help="draw a contact sheet of random mined pairs",
                                   description=__doc__)
    parser.add_argument("pairs", metavar="PAIRS_URI",
                        help="mining output folder, its pairs/ folder or one Parquet file (path or s3://)")
    parser.add_argument("--out", required=True, help="PNG to write (path or s3://)")
    parser.add_argument("--num", type=int, default=16, help="number of pairs (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice (default 0)")
    parser.add_argument("--tile", type=int, default=192, help="tile size in pixels (default 192)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..mining.preview import write_contact_sheet

    count = write_contact_sheet(args.pairs, args.out, num=args.num, seed=args.seed, tile=args.tile)
    print(f"wrote {count} pairs to {args.out}")
    return 0
