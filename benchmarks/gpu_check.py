"""CUDA checks and GPU timings of the model library (plain PyTorch, no Ray), for a machine with a GPU.

    python benchmarks/gpu_check.py [--presets r101c-vitb16,swinb-vitl14] [--out gpu_check.json]

Checks (each prints ok / FAILED with the measured number):

1. the masked CLIP with an all-ones mask equals open_clip's ``encode_image`` on CUDA (ViT-B-16,
   ViT-L-14, random weights, TF32 off; atol 1e-5 as on the CPU);
2. ``Segmenter.segment`` on CUDA agrees with the CPU (same seeded weights): share of equal labels;
3. a real CUDA out-of-memory error is classified as a device failure (so per-image handlers re-raise it).

Timings (random weights: speed does not depend on them; baselines from the same run):

4. ``segment()`` latency per preset on generated 640x480 scenes with the ADE-150 vocabulary;
5. region encoder: regions/s with one request's regions per forward vs 16 requests' regions in
   one forward (what Serve's cross-request batching buys on a GPU), ratio batched / per-request;
   region preprocessing, batched vs the tests' per-mask reference loop (and their agreement);
6. ``RegionTrainer.step`` samples/s (ft and mpt, batch 32), fp32 vs ``precision=auto`` (bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

from ovseg_ray.data.benchmarks import class_list
from ovseg_ray.data.images import load_image
from ovseg_ray.data.synth import generate_dataset
from ovseg_ray.device import is_device_failure
from ovseg_ray.inference import Segmenter
from ovseg_ray.models.clip import create_clip
from ovseg_ray.models.masked_clip import MaskedVisionEncoder
from ovseg_ray.models.ovseg import build_model
from ovseg_ray.training.clip_steps import RegionTrainer, build_training_model

REPORT: dict = {"checks": {}, "timings": {}}
FAILED: list[str] = []
DEVICE = "cuda"  # --device cpu: a dry run of the script's logic on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def record_check(name: str, ok: bool, detail: str) -> None:
    REPORT["checks"][name] = {"ok": ok, "detail": detail}
    print(f"[{'ok' if ok else 'FAILED'}] {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def synced_time(fn, repeats: int, warmup: int = 2) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls, CUDA work included."""
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def scenes(count: int) -> list[np.ndarray]:
    """``count`` generated scenes resized to 640x480 (the timings' images)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, images=count, seed=0)
        folder = os.path.join(tmp, "images")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))[:count]
        return [cv2.resize(load_image(os.path.join(folder, n)), (640, 480), interpolation=cv2.INTER_LINEAR)
                for n in names]


def check_equivalence() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for arch in ("ViT-B-16", "ViT-L-14"):
        torch.manual_seed(0)
        clip = create_clip(arch).to(DEVICE).eval()
        encoder = MaskedVisionEncoder(clip.visual, prompt_depth=3).to(DEVICE).eval()
        size = encoder.image_size
        images = torch.randn(4, 3, size, size, device=DEVICE)
        half = torch.ones(4, size, size, device=DEVICE)
        half[:, : size // 2] = 0
        with torch.no_grad():
            reference = clip.encode_image(images)
            ours = encoder(images, torch.ones(4, size, size, device=DEVICE))
            masked = encoder(images, half)
        diff = float((ours - reference).abs().max())
        moved = float((masked - reference).abs().max())
        record_check(f"equivalence {arch} ({DEVICE})", diff <= 1e-5 and moved > 1e-3,
                     f"max |masked CLIP (all-ones mask) - encode_image| = {diff:.2e}; half-masked moves it by {moved:.2e}")


def check_cpu_vs_cuda(images: list[np.ndarray], classes: list[str], preset: str) -> None:
    cpu = Segmenter(build_model(preset, device="cpu"))
    gpu = Segmenter(build_model(preset, device=DEVICE))  # on a dry run both are CPU
    agree = []
    for image in images:
        a = cpu.segment(image, classes).labels
        b = gpu.segment(image, classes).labels
        agree.append(float((a == b).mean()))
    share = float(np.mean(agree))
    record_check(f"segment cpu == {DEVICE} ({preset})", share >= 0.99,
                 f"{share:.4%} of pixels get the same label over {len(images)} images")


def check_oom() -> None:
    try:
        torch.empty(2**44, dtype=torch.uint8, device=DEVICE)  # 16 TiB: refused at once
    except Exception as exc:  # noqa: BLE001 - the point is which type arrives
        record_check("CUDA OOM is a device failure", is_device_failure(exc), f"{type(exc).__name__}")
    else:
        record_check("CUDA OOM is a device failure", False, "a 16 TiB allocation succeeded?")


def time_segment(preset: str, images: list[np.ndarray], classes: list[str]) -> None:
    segmenter = Segmenter(build_model(preset, device=DEVICE))
    reset_peak()
    results = []

    def run_all():
        results.clear()
        results.extend(segmenter.segment(image, classes) for image in images)

    seconds = synced_time(run_all, repeats=3, warmup=1) / len(images)
    stages = {k: float(np.mean([r.timings[k] for r in results])) for k in results[0].timings}
    valid = float(np.mean([r.num_valid_regions for r in results]))
    peak = peak_gib()
    REPORT["timings"][f"segment {preset}"] = {"seconds_per_image": seconds, "stages": stages,
                                              "valid_regions": valid, "peak_gib": peak}
    print(f"segment {preset}: {seconds * 1000:.1f} ms/image ({1 / seconds:.1f} images/s) at 640x480, "
          f"{len(classes)} classes, {valid:.0f} regions/image; stages (s) "
          + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()) + f"; peak {peak:.2f} GiB", flush=True)
    time_region_batching(preset, segmenter, images)
    time_region_preprocessing(preset, segmenter, images)


def time_region_preprocessing(preset: str, segmenter: Segmenter, images: list[np.ndarray]) -> None:
    """The batched region preprocessing against the per-mask loop of the tests' reference, same inputs."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from official_reference import regions_loop

    threshold = segmenter.config.mask_threshold
    items = [(p.image, p.binary_masks(threshold)) for p in map(segmenter.propose, images)]
    size = segmenter.regions.size
    batched = synced_time(lambda: [segmenter.regions(image, masks) for image, masks in items], repeats=3)
    looped = synced_time(lambda: [regions_loop(image, masks, size) for image, masks in items], repeats=3)
    diff = max(float((segmenter.regions(i, m).images - regions_loop(i, m, size)[0]).abs().max()) for i, m in items)
    REPORT["timings"][f"region preprocessing {preset}"] = {"batched_s": batched, "per_mask_loop_s": looped,
                                                          "ratio": looped / batched, "max_diff": diff}
    record_check(f"region preprocessing {preset} equals the per-mask loop", diff <= 1e-4, f"max diff {diff:.2e}")
    print(f"region preprocessing {preset}: batched {batched / len(items) * 1000:.2f} ms/image, per-mask loop "
          f"{looped / len(items) * 1000:.2f} ms/image, {looped / batched:.1f}x", flush=True)


def time_region_batching(preset: str, segmenter: Segmenter, images: list[np.ndarray]) -> None:
    threshold = segmenter.config.mask_threshold
    items = []
    for image in images:
        proposals = segmenter.propose(image)
        items.append((proposals.image, proposals.binary_masks(threshold)))
    regions = sum(int(m.flatten(1).any(1).sum()) for _, m in items)
    per_request = synced_time(lambda: [segmenter.embed_regions_many([item]) for item in items], repeats=5)
    batched = synced_time(lambda: segmenter.embed_regions_many(items), repeats=5)
    ratio = per_request / batched
    REPORT["timings"][f"regions {preset}"] = {"regions": regions, "per_request_s": per_request,
                                              "batched_s": batched, "ratio": ratio}
    print(f"regions {preset}: {regions} regions of {len(items)} requests: per-request forwards "
          f"{regions / per_request:.0f} regions/s, one batched forward {regions / batched:.0f} regions/s, "
          f"ratio {ratio:.2f}x", flush=True)


def time_training(preset: str, batch: int = 32, steps: int = 10) -> None:
    model = build_training_model(preset).to(DEVICE)
    size = model.region_encoder.image_size
    generator = torch.Generator().manual_seed(0)
    regions = torch.randn(batch, 3, size, size, generator=generator)
    masks = torch.zeros(batch, size, size)
    for i in range(batch):  # boxes of various sizes: some patches masked, some not
        side = size // 4 + (i * 7) % (size // 2)
        masks[i, :side, : size - side // 2] = 1
    vocabulary = torch.nn.functional.normalize(torch.randn(512, model.region_encoder.output_dim), dim=-1)
    noun_ids = torch.randperm(512, generator=generator)[:batch]
    for mode in ("ft", "mpt"):
        rates = {}
        for precision in ("fp32", "auto"):
            reset_peak()
            trainer = RegionTrainer(model, mode, vocabulary, precision=precision, total_steps=1000)
            losses = []
            seconds = synced_time(lambda: losses.append(trainer.step(regions, masks, noun_ids).loss),
                                  repeats=steps)
            rates[precision] = batch / seconds
            finite = all(np.isfinite(losses))
            record_check(f"train {preset} {mode} {precision} finite loss", finite,
                         f"losses {losses[0]:.3f} -> {losses[-1]:.3f}")
            print(f"train {preset} {mode} {precision}: {rates[precision]:.1f} samples/s, "
                  f"peak {peak_gib():.2f} GiB", flush=True)
        ratio = rates["auto"] / rates["fp32"]
        REPORT["timings"][f"train {preset} {mode}"] = {**rates, "ratio_auto_over_fp32": ratio}
        print(f"train {preset} {mode}: bf16 autocast / fp32 = {ratio:.2f}x", flush=True)
    del model
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="r101c-vitb16,swinb-vitl14")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--skip-training", action="store_true", help="inference checks and timings only")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: dry run of the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu for a dry run)", file=sys.stderr)
        return 2
    REPORT["device"] = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (dry run)"
    REPORT["torch"] = torch.__version__
    print(f"device {REPORT['device']}, torch {torch.__version__}", flush=True)
    images = scenes(args.images)
    ade = class_list("ade20k_150").clean_classes

    if DEVICE == "cuda":
        check_oom()
    check_equivalence()
    check_cpu_vs_cuda(images[:2], ade, "tiny")
    presets = [p for p in args.presets.split(",") if p]
    if presets:
        check_cpu_vs_cuda(images[:1], ade, presets[0])
    torch.backends.cuda.matmul.allow_tf32 = True  # the timings run as a user would (TF32 allowed)
    torch.backends.cudnn.allow_tf32 = True
    for preset in presets:
        time_segment(preset, images, ade)
        if not args.skip_training:
            time_training(preset)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(REPORT, handle, indent=1)
    print(f"gpu_check: {len(REPORT['checks']) - len(FAILED)} of {len(REPORT['checks'])} checks ok"
          + (f"; FAILED: {', '.join(FAILED)}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
