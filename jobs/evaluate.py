"""Ray job entrypoint for zero-shot evaluation (same flags as ``ovseg-ray eval``)::

    ray job submit --working-dir . -- python jobs/evaluate.py --config cluster/eval.yaml --compute.max-actors 4

Inside ``ray job submit`` it joins that cluster; run directly it starts a local Ray.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
