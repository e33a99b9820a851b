"""Noun extraction before (the code at a base commit, default 45140b2) and after (this checkout), on the
labelled caption set ``tests/data/labelled_captions.txt``, same run.

    python benchmarks/noun_quality.py [--base 45140b2] [--misses 20]

Prints micro precision/recall of both and the captions the current extractor still gets wrong.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def base_extractor(base: str):
    """The base commit's ``nouns`` module (it imports nothing of the package), loaded from git."""
    source = subprocess.run(["git", "show", f"{base}:ovseg_ray/mining/nouns.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("nouns_at_base")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{base}:nouns.py", "exec"), module.__dict__)
    return module.NounExtractor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="45140b2")
    parser.add_argument("--misses", type=int, default=20, help="how many remaining misses to print")
    args = parser.parse_args(argv)
    os.environ.setdefault("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))
    sys.path.insert(0, str(REPO))
    from ovseg_ray.mining.noun_quality import read_labelled, score
    from ovseg_ray.mining.nouns import NounExtractor

    labelled = read_labelled(REPO / "tests" / "data" / "labelled_captions.txt")
    before = score(base_extractor(args.base).nouns, labelled)
    after = score(NounExtractor().nouns, labelled)
    print(f"before ({args.base}): {before.line()}")
    print(f"after (this checkout): {after.line()}")
    for caption, found, wanted in after.misses[:args.misses]:
        print(f"  {caption!r}: got {list(found)}, expected {list(wanted)}")
    print(f"{len(after.misses)} captions still differ (before: {len(before.misses)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
