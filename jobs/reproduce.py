"""Ray job entry point for the small-scale reproduction (same config as the CLI).

    ray job submit --working-dir . -- python jobs/reproduce.py --out /shared/reproduce --seed 0
    python jobs/reproduce.py --out runs/reproduce

Every flag of ``ovseg-ray reproduce`` works here; re-submitting the same job resumes it.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    return cli(["reproduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
