"""Ray job entry point for pretraining a CLIP on images and captions (same config as the CLI).

    ray job submit --working-dir . -- python jobs/pretrain_clip.py --config pretrain_clip.yaml
    python jobs/pretrain_clip.py --data.images world/train/images --data.captions world/train/annotations/captions.json

Every flag of ``ovseg-ray pretrain-clip`` works here; re-submitting the same job resumes it.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["pretrain-clip", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
