"""The GPU path's figures in one prepared run (issue 18), for a machine with one CUDA GPU.

    python benchmarks/gpu_suite.py [--presets r101c-vitb16,swinb-vitl14] [--out gpu_suite.json]
    python benchmarks/gpu_suite.py --smoke        # CPU, tiny preset, a few images: proves the script runs

Per preset, every figure as a ratio measured in this run plus the absolute number, the GPU named:

1. ``Segmenter.segment_many`` ms/image at 640x480 with the ADE-150 vocabulary: fp32 vs bf16, batches
   of 1 vs 8 images (goal: swinb-vitl14 <= 50 ms/image in bf16, batch 8), and the bf16 labels' share
   of pixels equal to fp32's;
2. the region preprocessing against the tests' per-mask loop (goal >= 10x) and one shared CLIP
   forward for 8 images' regions against one forward per image (``gpu_check`` helpers);
3. mining images/s on the one GPU (both actor pools share it; steady rate, start-up excluded;
   goal >= 20 images/s);
4. serving p50/p99 at 1/8/32 concurrent clients (``serve_load.py`` in a subprocess, region batching
   on vs off, replicas sharing the GPU).

Then the CUDA checks of ``gpu_check.py`` (masked CLIP == encode_image, CPU == CUDA labels, OOM is a
device failure). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_check  # noqa: E402  (the checks and the region timings, shared)

from ovseg_ray.data.benchmarks import class_list  # noqa: E402
from ovseg_ray.inference import Segmenter  # noqa: E402
from ovseg_ray.models.ovseg import build_model  # noqa: E402

REPORT = gpu_check.REPORT


def save(path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1, default=str))


def time_precision_and_batching(preset: str, images: list[np.ndarray], classes: list[str], repeats: int,
                                batch: int) -> None:
    """ms/image of segment_many for fp32/bf16 x batch 1/``batch``; bf16's label agreement with fp32."""
    model = build_model(preset, device=gpu_check.DEVICE)
    figures, labels = {}, {}
    for precision in ("fp32", "bf16"):
        segmenter = Segmenter(model, precision=precision)
        labels[precision] = [r.labels for r in segmenter.segment_many(images[:batch], classes)]
        for size in (1, batch):
            def run(size=size):
                for start in range(0, len(images), size):
                    segmenter.segment_many(images[start: start + size], classes)

            seconds = gpu_check.synced_time(run, repeats=repeats, warmup=1) / len(images)
            figures[f"{precision} batch {size}"] = seconds * 1000
            print(f"segment {preset} {precision} batch {size}: {seconds * 1000:.1f} ms/image "
                  f"({1 / seconds:.1f} images/s)", flush=True)
    agreement = float(np.mean([(a == b).mean() for a, b in zip(labels["fp32"], labels["bf16"])]))
    base = figures["fp32 batch 1"]
    ratios = {name: base / value for name, value in figures.items()}
    REPORT["timings"][f"segment precision/batch {preset}"] = {
        "ms_per_image": figures, "speedup_over_fp32_batch_1": ratios, "bf16_label_agreement": agreement}
    print(f"segment {preset}: speed-up over fp32 batch 1: "
          + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
          + f"; bf16 labels equal fp32's on {agreement:.4%} of pixels", flush=True)
    segmenter = Segmenter(model, precision="auto")
    gpu_check.time_region_preprocessing(preset, segmenter, images)
    gpu_check.time_region_batching(preset, segmenter, images)
    del model, segmenter
    if gpu_check.DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_mining(preset: str, images: int, work: Path, smoke: bool) -> None:
    """Steady images/s of ``mine_pairs`` with both stages on the one GPU (half a GPU per actor)."""
    import ray

    from ovseg_ray.data.synth import generate_dataset
    from ovseg_ray.mining.config import MiningConfig
    from ovseg_ray.mining.pipeline import mine_pairs
    from ovseg_ray.raycluster import init_ray

    data = work / f"mining-data-{images}"
    if not (data / "annotations" / "captions.json").exists():
        generate_dataset(str(data), images=images, seed=0, eval_images=2)
    gpus = 0 if smoke else 0.5
    stage = {"preset": preset, "batch_size": 8, "num_cpus": 0.5 if smoke else 2, "num_gpus": gpus,
             "min_actors": 1, "max_actors": 1}
    config = MiningConfig(images=str(data / "images"), captions=str(data / "annotations" / "captions.json"),
                          output=str(work / f"mined-{preset}"), shard_size=32, proposals=stage, matching=stage)
    init_ray(num_cpus=os.cpu_count() or 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = mine_pairs(config).summary
    finally:
        ray.shutdown()
    run = summary["this_run"]  # this run's speed (a summary also keeps earlier runs' figures apart)
    steady = run.get("steady_images_per_s")
    end_to_end = images / run["wall_time_s"]
    REPORT["timings"][f"mining {preset}"] = {"images": images, "steady_images_per_s": steady,
                                            "end_to_end_images_per_s": end_to_end, "pairs": summary.get("pairs")}
    print(f"mining {preset}: {steady or float('nan'):.2f} images/s steady, {end_to_end:.2f} end to end "
          f"({images} images, {summary.get('pairs')} pairs, one GPU shared by both stages)", flush=True)


def time_serving(preset: str, smoke: bool) -> None:
    """serve_load.py in its own process (its own Ray): p50/p99 at 1/8/32 clients."""
    args = ["--preset", preset, "--repeats", "1"]
    args += (["--levels", "1,8", "--requests", "8", "--warmup", "2", "--images", "4", "--num-gpus", "0"] if smoke
             else ["--levels", "1,8,32", "--requests", "96", "--num-gpus", "0.25", "--replica-cpus", "1"])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / "serve_load.py"), *args], capture_output=True, text=True)
    print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", flush=True)
    REPORT["timings"][f"serving {preset}"] = {"returncode": done.returncode, "seconds": time.perf_counter() - start,
                                             "table": done.stdout[-2500:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="r101c-vitb16,swinb-vitl14")
    parser.add_argument("--images", type=int, default=8, help="images per segment timing (a multiple of --batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mining-images", type=int, default=256)
    parser.add_argument("--sections", default="segment,mining,serving,checks")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset, few images: a run of the logic")
    parser.add_argument("--out", default=None, help="write the report as JSON here (after every section)")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.images, args.batch, args.mining_images = "tiny", 4, 2, 8
        torch.set_num_threads(1)
    gpu_check.DEVICE = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device here: run with --smoke for a CPU run of the script", file=sys.stderr)
        return 2
    REPORT["device"] = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    REPORT["torch"] = torch.__version__
    print(f"gpu_suite on {REPORT['device']}, torch {torch.__version__}", flush=True)
    sections = set(args.sections.split(","))
    presets = [p for p in args.presets.split(",") if p]
    images = gpu_check.scenes(args.images)
    classes = class_list("ade20k_150").clean_classes
    if not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # timed as a user runs (TF32 allowed for fp32)
        torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            if "segment" in sections:
                time_precision_and_batching(preset, images, classes, repeats=1 if args.smoke else 3, batch=args.batch)
                save(args.out)
            if "mining" in sections:
                time_mining(preset, args.mining_images, Path(tmp), args.smoke)
                save(args.out)
            if "serving" in sections:
                time_serving(preset, args.smoke)
                save(args.out)
    if "checks" in sections:
        if not args.smoke:
            gpu_check.check_oom()
            gpu_check.check_equivalence()
        gpu_check.check_cpu_vs_cuda(images[:2], classes, "tiny")
    save(args.out)
    failed = [name for name, t in REPORT["timings"].items() if name.startswith("serving") and t["returncode"]]
    print(f"gpu_suite: {len(REPORT['timings'])} timings, {len(REPORT['checks']) - len(gpu_check.FAILED)} of "
          f"{len(REPORT['checks'])} checks ok" + (f"; FAILED: {', '.join(gpu_check.FAILED + failed)}"
                                                  if gpu_check.FAILED or failed else ""), flush=True)
    return 1 if gpu_check.FAILED or failed else 0


if __name__ == "__main__":
    sys.exit(main())
