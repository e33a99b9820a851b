"""What the skip options do to the label map and the time, on the CPU with the tiny preset.

    python benchmarks/skip_options.py [--images 6] [--preset tiny]

For each setting of ``skip_min_area`` (given as a share of the processing size's pixels) and
``skip_no_object_above``: the share of proposals sent to no CLIP region, the share of pixels whose
label differs from the run with the options off, and the time per image against that run (same
process, same images, ADE-150 vocabulary). Random weights: the figures show the mechanism, not what a
trained model's proposals would give (there, a no-object probability near 1 is the common case for
the queries that match nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import scenes  # noqa: E402

from ovseg_ray.data.benchmarks import class_list  # noqa: E402
from ovseg_ray.inference import Segmenter, processing_size  # noqa: E402
from ovseg_ray.models.ovseg import build_model  # noqa: E402


def run(segmenter: Segmenter, images: list[np.ndarray], classes: list[str]) -> tuple[list, float, int]:
    start = time.perf_counter()
    results = [segmenter.segment(image, classes) for image in images]
    seconds = (time.perf_counter() - start) / len(images)
    return [r.labels for r in results], seconds, sum(r.num_valid_regions for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.preset)
    images, classes = scenes(args.images), class_list("ade20k_150").clean_classes
    height, width = processing_size(480, 640, model.config.min_size, model.config.max_size)
    settings = [("off", {})]
    settings += [(f"min area {share:.0%}", {"skip_min_area": int(share * height * width)})
                 for share in (0.01, 0.1, 0.5, 0.6)]
    settings += [(f"no-object > {p}", {"skip_no_object_above": p}) for p in (0.9999, 0.99, 0.5)]
    base_labels = base_seconds = base_regions = None
    print(f"{args.preset}: {len(images)} images 640x480 (processing {height}x{width}), {len(classes)} classes")
    print(f"{'setting':<18} {'regions':>8} {'skipped':>8} {'pixels changed':>15} {'time ratio':>11}")
    for name, options in settings:
        run(Segmenter(model, **options), images[:1], classes)  # warm-up
        labels, seconds, regions = run(Segmenter(model, **options), images, classes)
        if base_labels is None:
            base_labels, base_seconds, base_regions = labels, seconds, regions
        changed = float(np.mean([(a != b).mean() for a, b in zip(labels, base_labels)]))
        skipped = 1.0 - regions / max(1, base_regions)
        print(f"{name:<18} {regions:>8} {skipped:>8.1%} {changed:>15.4%} {seconds / base_seconds:>10.2f}x",
              flush=True)
    print(f"skip_options: {len(settings)} settings over {len(images)} images; off = {base_seconds * 1000:.0f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
