"""Ray job entrypoint for batch segmentation (same flags as ``ovseg-ray segment-batch``)::

    ray job submit --working-dir . -- python jobs/segment_batch.py \
        --input s3://bucket/photos --classes "sky,grass,dog" --out s3://bucket/segmented

Inside ``ray job submit`` it joins that cluster; run directly it starts a local Ray.
"""

from __future__ import annotations

import sys

from ovseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment-batch", *sys.argv[1:]]))
