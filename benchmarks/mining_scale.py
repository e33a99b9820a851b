"""Mining at scale (issue 17): the driver's peak memory for 1K vs 10K images, and throughput before/after.

    python benchmarks/mining_scale.py [--small 1000 --large 10000] [--throughput-images 48 --repeats 2]

1. **Driver memory.** WebDataset tars of N synthetic images (the synthetic dataset's images repeated
   under new keys, 500 per tar), mined with the ``tiny`` preset on a local Ray; each run is a fresh
   process whose own resident memory (the driver: it streams the pipeline and commits shards) is
   sampled every 50 ms. Printed: peak RSS and its growth over the RSS just before mining, for both
   sizes. The driver holds per-shard counts only, so the growth should not scale with N.
2. **Throughput before/after.** The same synthetic COCO dataset mined by the code at ``--base``
   (default 45140b2: the driver collects every row and writes the shards) and by this checkout
   (workers write, the driver sees counts), each in a fresh process with its own local Ray, in
   alternating order; images/s end to end and steady, and their ratio after/before per repeat.

Each measurement is a child process of this script (``--child``), so both code versions and both
sizes start from the same state.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOLS = {"proposals": {"batch_size": 8, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
         "matching": {"batch_size": 8, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5}}


def current_rss() -> int:
    """This process's resident memory in bytes (Linux's /proc; no psutil needed)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> None:
    """Run one mining job in this process; print its figures as one JSON line."""
    sys.path.insert(0, spec["code"])
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    import ray.data

    from ovseg_ray.mining.config import MiningConfig
    from ovseg_ray.mining.pipeline import mine_pairs

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=512 * 2**20)
    ray.data.DataContext.get_current().enable_progress_bars = False
    samples = [current_rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            samples.append(current_rss())

    threading.Thread(target=sample, daemon=True).start()
    before = samples[0]
    summary = mine_pairs(MiningConfig.model_validate(spec["config"])).summary
    done.set()
    run = summary.get("this_run", summary)  # the base commit's summary has the rates at the top level
    # The kernel's high-water mark also catches a peak between two samples.
    peak = max(max(samples), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"peak_rss": peak, "rss_before": before, "images": run["images_processed"],
                      "wall_s": run["wall_time_s"], "images_per_s": run["images_per_s"],
                      "steady_images_per_s": run["steady_images_per_s"], "pairs": summary["pairs"]}))
    ray.shutdown()


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": spec["code"]}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=spec["code"],
                          capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def write_tars(source_images: list[tuple[bytes, str]], count: int, out: Path, per_tar: int = 500) -> None:
    """``count`` samples (images repeated under new keys) in tars of ``per_tar``."""
    out.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, count, per_tar)):
        with tarfile.open(out / f"{number:05d}.tar", "w") as archive:
            for key in range(start, min(count, start + per_tar)):
                image, caption = source_images[key % len(source_images)]
                for suffix, data in (("jpg", image), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key:09d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--throughput-images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", default="45140b2")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    os.environ.setdefault("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))
    sys.path.insert(0, str(REPO))
    from ovseg_ray.data.synth import generate_dataset

    work = Path(tempfile.mkdtemp(prefix="mining-scale-"))
    data = work / "coco"
    generate_dataset(str(data), images=max(args.throughput_images, 32), seed=0, eval_images=1)
    captions = json.loads((data / "annotations" / "captions.json").read_text())
    first_caption = {}
    for ann in sorted(captions["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(ann["image_id"], ann["caption"])
    sources = [((data / "images" / im["file_name"]).read_bytes(), first_caption[im["id"]])
               for im in sorted(captions["images"], key=lambda im: im["id"])]

    if not args.skip_memory:
        memory = {}
        for count in (args.small, args.large):
            tars = work / f"wds-{count}"
            write_tars(sources, count, tars)
            config = {"format": "webdataset", "data": str(tars), "output": str(work / f"mined-{count}"), **POOLS}
            result = run_child({"code": str(REPO), "config": config})
            memory[count] = result
            print(f"{count} images: driver peak RSS {result['peak_rss'] / 2**20:.1f} MiB, "
                  f"{(result['peak_rss'] - result['rss_before']) / 2**20:.1f} MiB over the RSS before mining; "
                  f"{result['images']} images in {result['wall_s']:.1f}s, {result['pairs']} pairs", flush=True)
        small, large = memory[args.small], memory[args.large]
        print(f"driver peak RSS {args.large} vs {args.small} images: {large['peak_rss'] / small['peak_rss']:.2f}x "
              f"({args.large // args.small}x the images)")

    if not args.skip_throughput:
        base = work / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=REPO, check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(base, filter="data")
        ratios, steady_ratios = [], []
        for repeat in range(args.repeats):
            results = {}
            order = (("before", str(base)), ("after", str(REPO)))
            for name, code in order if repeat % 2 == 0 else tuple(reversed(order)):
                out = work / f"throughput-{name}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                config = {"images": str(data / "images"), "captions": str(data / "annotations" / "captions.json"),
                          "output": str(out), "shard_size": 8, **POOLS}
                results[name] = run_child({"code": code, "config": config})
                time.sleep(1)
            before, after = results["before"], results["after"]
            ratios.append(after["images_per_s"] / before["images_per_s"])
            if before["steady_images_per_s"] and after["steady_images_per_s"]:
                steady_ratios.append(after["steady_images_per_s"] / before["steady_images_per_s"])
            print(f"repeat {repeat + 1}: before ({args.base}) {before['images_per_s']:.2f} images/s end to end, "
                  f"{before['steady_images_per_s']} steady; after {after['images_per_s']:.2f} end to end, "
                  f"{after['steady_images_per_s']} steady; pairs {before['pairs']} vs {after['pairs']}", flush=True)
        print(f"throughput after/before: end to end median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x, {len(ratios)} runs)"
              + (f"; steady median {statistics.median(steady_ratios):.2f}x" if steady_ratios else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
