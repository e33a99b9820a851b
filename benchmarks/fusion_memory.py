"""Peak memory of one large segmentation: 847 classes (ADE-847) on a 4000x3000 photo, on the CPU.

    python benchmarks/fusion_memory.py [--height 3000 --width 4000 --classes ade20k_847]

The model is the tiny architecture with the R101c preset's processing size (shorter side 512, so the
fusion works on 512x683 score maps) and 100 queries, random weights: memory does not depend on the
weights. Each measurement runs in a fresh process; the process's peak resident memory is reset
(``/proc/self/clear_refs``) after the model is built and the image decoded, so the figure is what
``Segmenter.segment`` itself adds (proposals, regions, fusion at the output size). The baseline printed
next to it is the resident memory before the call, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(height: int, width: int, benchmark: str) -> dict:
    import numpy as np
    import torch

    from ovseg_ray.data.benchmarks import class_list
    from ovseg_ray.inference import Segmenter
    from ovseg_ray.models.ovseg import build_model, load_preset

    torch.set_num_threads(2)
    config = load_preset("tiny").model_copy(deep=True)
    config.min_size, config.max_size = 512, 2048
    config.maskformer.num_queries = 100
    segmenter = Segmenter(build_model(config, seed=0))
    classes = class_list(benchmark).prompt_names()
    segmenter.text(classes)  # text embeddings are cached state, not part of one segmentation
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 256, (height // 50 + 1, width // 50 + 1, 3), dtype=np.uint8),
                    np.ones((50, 50, 1), np.uint8))[:height, :width].copy()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM (the peak) to the current resident size
    start = time.perf_counter()
    result = segmenter.segment(image, classes)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {"height": height, "width": width, "classes": len(classes), "rss_before_mib": before / 1024,
            "peak_mib": peak / 1024, "added_mib": (peak - before) / 1024, "seconds": seconds,
            "timings": result.timings, "labels_shape": list(result.labels.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--classes", default="ade20k_847", help="benchmark whose class list is the vocabulary")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.height, args.width, args.classes)))
        return
    command = [sys.executable, __file__, "--child", "--height", str(args.height), "--width", str(args.width),
               "--classes", args.classes]
    out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"segment() of a {out['width']}x{out['height']} image with {out['classes']} classes: "
          f"peak {out['peak_mib']:.0f} MiB resident, {out['added_mib']:.0f} MiB above the "
          f"{out['rss_before_mib']:.0f} MiB before the call; {out['seconds']:.1f} s "
          f"({', '.join(f'{k} {v:.2f}s' for k, v in out['timings'].items())})")


if __name__ == "__main__":
    main()
