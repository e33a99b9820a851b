"""Region preprocessing: the batched implementation against a per-mask loop, in the same run.

    python benchmarks/region_stage.py [--device cpu|cuda] [--masks 100] [--repeats 5]

Both compute the official crop (box, fill at source resolution, normalise, resize the crop alone to
224): the loop calls ``F.interpolate`` once per mask, the library does all masks of the image in
batched tensor operations. Inputs: a 512x683 image (the R101c processing size of a 480x640 photo)
and ``--masks`` boxes of random size and place with random holes, seeded. Prints the median time of
each, their ratio and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from official_reference import regions_loop  # noqa: E402  (the tests' per-mask reference)

from ovseg_ray.models.regions import RegionPreprocessor  # noqa: E402


def make_masks(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    for k in range(count):
        h = int(torch.randint(4, height // 2, (1,), generator=generator))
        w = int(torch.randint(4, width // 2, (1,), generator=generator))
        y = int(torch.randint(0, height - h, (1,), generator=generator))
        x = int(torch.randint(0, width - w, (1,), generator=generator))
        masks[k, y:y + h, x:x + w] = torch.rand(h, w, generator=generator) > 0.2
    return masks


def timed(function, device: torch.device, repeats: int) -> tuple[float, object]:
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    image = (torch.rand(3, 512, 683, generator=torch.Generator().manual_seed(1)) * 255).to(device)
    masks = make_masks(args.masks, 512, 683).to(device)
    preprocess = RegionPreprocessor(224)
    batched_s, batch = timed(lambda: preprocess(image, masks), device, args.repeats)
    loop_s, (images, crop_masks, _) = timed(lambda: regions_loop(image, masks, 224), device, args.repeats)
    diff = (batch.images - images.to(device)).abs().max().item()
    same_masks = torch.equal(batch.masks, crop_masks.to(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"region preprocessing of {args.masks} masks on a 512x683 image ({name}):")
    print(f"  batched  {batched_s * 1000:8.1f} ms  ({args.masks / batched_s:.0f} regions/s)")
    print(f"  per-mask {loop_s * 1000:8.1f} ms  ({args.masks / loop_s:.0f} regions/s)")
    print(f"  speed-up {loop_s / batched_s:.2f}x; max |difference| {diff:.2e}, masks identical: {same_masks}")


if __name__ == "__main__":
    main()
