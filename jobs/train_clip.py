"""Ray job entry point for fine-tuning the masked CLIP on mined pairs (same config as the CLI).

    ray job submit --working-dir . -- python jobs/train_clip.py --config cluster/train_clip.yaml
    python jobs/train_clip.py --data.pairs runs/mine/pairs --mode mpt --run.num-workers 2

Every flag of ``ovseg-ray train-clip`` works here; re-submitting the same job resumes it.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["train-clip", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
