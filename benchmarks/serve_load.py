"""Load test of the HTTP service: requests/s and p50/p99 latency, region batching on vs off.

    python benchmarks/serve_load.py                       # tiny preset, local Ray, levels 1,4,8,16
    python benchmarks/serve_load.py --preset r101c-vitb16 --num-gpus 0.5 --requests 200

Both variants are deployed side by side on the same Ray (routes /on and /off) and measured
alternately at each concurrency level, with the same images, vocabularies and clients; the last
table gives the on/off ratios. Clients post JPEG files over real HTTP (multipart) from threads,
each with its own connection.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

VOCABULARIES = [
    ["sky", "grass", "water", "sand", "road", "wall", "floor", "tree"],
    ["ball", "car", "boat", "bottle", "clock", "kite", "star", "sky", "grass", "water", "sand", "road"],
    ["red ball", "blue sky", "green grass", "a wooden boat"],
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_level(url: str, images: list[bytes], concurrency: int, requests: int) -> dict:
    """``requests`` POSTs from ``concurrency`` threads: latencies, wall time, batch sizes, failures."""
    latencies, batches, failures = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                start = time.perf_counter()
                response = http.post(
                    "v1/segment",
                    files={"image": ("image.jpg", images[index % len(images)])},
                    data={"classes": json.dumps(VOCABULARIES[index % len(VOCABULARIES)])},
                )
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        batches.append(response.json()["region_batch"]["requests"])
                    else:
                        failures.append(f"{response.status_code}: {response.text[:200]}")

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return {"latencies": latencies, "batches": batches, "failures": failures, "wall": time.perf_counter() - start}


def summarize(runs: list[dict]) -> dict:
    """Pool the repeats of one (mode, level): throughput over their total wall time, latency percentiles."""
    latencies = np.array([x for r in runs for x in r["latencies"]] or [np.nan])
    batches = [x for r in runs for x in r["batches"]]
    failures = [x for r in runs for x in r["failures"]]
    ok = sum(len(r["latencies"]) for r in runs)
    return {
        "ok": ok,
        "failed": len(failures),
        "rps": ok / sum(r["wall"] for r in runs),
        "p50_ms": float(np.percentile(latencies, 50)) * 1000,
        "p99_ms": float(np.percentile(latencies, 99)) * 1000,
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
        "max_batch": int(max(batches, default=0)),
        "first_failure": failures[0] if failures else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--levels", default="1,4,8,16", help="client concurrency levels (default 1,4,8,16)")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per level and variant, alternating on/off (default 2)")
    parser.add_argument("--warmup", type=int, default=8, help="requests before measuring (default 8)")
    parser.add_argument("--images", type=int, default=8, help="distinct synthetic images (default 8)")
    parser.add_argument("--proposer-replicas", type=int, default=1)
    parser.add_argument("--classifier-replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=0.3,
                        help="num_cpus of each replica; both variants' replicas must fit (default 0.3)")
    parser.add_argument("--num-gpus", default="auto", help="num_gpus of each model replica (auto, 0, 0.5, ...)")
    parser.add_argument("--max-batch-requests", type=int, default=16)
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a local Ray)")
    args = parser.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray import serve

    from ovseg_ray.data.synth import generate_dataset
    from ovseg_ray.raycluster import init_ray
    from ovseg_ray.serving.app import deploy
    from ovseg_ray.serving.config import ServeConfig

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, images=args.images, seed=0, eval_images=2)
        folder = os.path.join(tmp, "images")
        images = [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))]

    init_ray(args.address)
    port = _free_port()
    num_gpus = args.num_gpus if args.num_gpus == "auto" else float(args.num_gpus)
    model_replica = {"num_cpus": args.replica_cpus, "num_gpus": num_gpus,
                     "max_ongoing_requests": max(64, args.max_batch_requests)}
    urls = {}
    try:
        # Both variants run side by side and are measured alternately, so that a change in the
        # machine's load during the run affects both alike.
        for mode in ("on", "off"):
            config = ServeConfig.model_validate({
                "app_name": f"ovseg-bench-{mode}",
                "route_prefix": f"/{mode}",
                "http": {"port": port},
                "model": {"preset": args.preset, "weights": args.weights},
                "batching": {"enabled": mode == "on", "max_batch_requests": args.max_batch_requests,
                             "batch_wait_timeout_s": args.batch_wait_s},
                "ingress": {"num_cpus": args.replica_cpus, "num_gpus": 0, "max_ongoing_requests": 256},
                "proposer": {**model_replica, "num_replicas": args.proposer_replicas},
                "classifier": {**model_replica, "num_replicas": args.classifier_replicas},
            })
            start = time.perf_counter()
            urls[mode] = deploy(config)
            print(f"[batching {mode}] deployed {args.preset} at {urls[mode]} in {time.perf_counter() - start:.1f}s "
                  f"(proposer x{args.proposer_replicas}, classifier x{args.classifier_replicas})", flush=True)
            run_level(urls[mode], images, 2, args.warmup)
        rows = {}
        for level in levels:
            runs = {"on": [], "off": []}
            for _ in range(args.repeats):
                for mode in ("on", "off"):
                    runs[mode].append(run_level(urls[mode], images, level, args.requests))
            for mode in ("on", "off"):
                row = rows[(mode, level)] = summarize(runs[mode])
                print(f"[batching {mode:>3}] concurrency {level:3d}: {row['rps']:7.2f} req/s"
                      f"  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:.2f} (max {row['max_batch']})"
                      f"  failed {row['failed']}" + (f"  e.g. {row['first_failure']}" if row["failed"] else ""),
                      flush=True)
    finally:
        serve.shutdown()

    print("\nregion batching on vs off (same run, same Ray):")
    print(f"{'clients':>7} | {'req/s on':>9} {'req/s off':>9} {'ratio':>6} | {'p50 on':>8} {'p50 off':>8} "
          f"| {'p99 on':>8} {'p99 off':>8} | {'batch on':>8}")
    for level in levels:
        on, off = rows[("on", level)], rows[("off", level)]
        ratio = f"{on['rps'] / off['rps']:5.2f}x" if off["rps"] > 0 else "   n/a"
        print(f"{level:>7} | {on['rps']:9.2f} {off['rps']:9.2f} {ratio} | "
              f"{on['p50_ms']:6.1f}ms {off['p50_ms']:6.1f}ms | {on['p99_ms']:6.1f}ms {off['p99_ms']:6.1f}ms | "
              f"{on['mean_batch']:8.2f}")
    failed = sum(r["failed"] for r in rows.values())
    print(f"summary: {sum(r['ok'] for r in rows.values())} requests ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
