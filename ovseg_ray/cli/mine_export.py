"""``ovseg-ray mine-export``: mined pairs as masked crops + nouns for open_clip's training scripts.

    ovseg-ray mine-export runs/pairs --out runs/export [--pairs-per-shard 1000] [--formats webdataset,csv]

WebDataset tar shards (``OUT/webdataset/shard-*.tar``: ``{key}.jpg`` crop, ``{key}.txt`` noun,
``{key}.json`` metadata) and the tab-separated CSV open_clip reads (``OUT/csv/train.csv``:
``filepath``, ``title``).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("mine-export", help="export mined pairs as masked crops for open_clip training",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", metavar="PAIRS_URI",
                        help="mining output folder, its pairs/ folder or one Parquet file (path or s3://)")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--pairs-per-shard", type=int, default=1000, help="crops per WebDataset tar (default 1000)")
    parser.add_argument("--formats", default="webdataset,csv", help="webdataset, csv or both (default both)")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="also export head nouns flagged as duplicates of a compound on the same mask")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..mining.export import export_pairs

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    result = export_pairs(args.pairs, args.out, args.pairs_per_shard, formats, args.keep_duplicates)
    print(result.summary_line(args.out))
    return 0
