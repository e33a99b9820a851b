"""Ray job entry point for training the open-vocabulary MaskFormer (same config as the CLI).

    ray job submit --working-dir . -- python jobs/train_maskformer.py --config cluster/train_maskformer.yaml
    python jobs/train_maskformer.py --config cluster/train_maskformer_cpu.yaml

Every flag of ``ovseg-ray train-maskformer`` works here; re-submitting the same job resumes it.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["train-maskformer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
