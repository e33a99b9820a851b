"""Fuzz run of the HTTP service from its own OpenAPI document (issue 15, acceptance 2).

    python benchmarks/fuzz_serving.py                 # >= 2000 generated requests, tiny preset, local Ray
    python benchmarks/fuzz_serving.py --cases 500

Deploys the service on a local Ray (127.0.0.1, a free port, image_uri allowed under a local folder
holding one image and under an HTTP prefix nobody serves), loads ``/openapi.json`` with schemathesis
and sends the requests that Hypothesis generates from it for every operation (valid and invalid
bodies alike, both content types of ``POST /v1/segment``) until at least ``--cases`` were sent. Every
answer must be a 2xx or 4xx: the closing line prints the count of responses >= 500 (0 expected) and
``/v1/info``'s own count of them. Exit status 1 if any was seen.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deploy(image_dir: Path) -> str:
    from PIL import Image

    from ovseg_ray.raycluster import init_ray
    from ovseg_ray.serving import ServeConfig, deploy

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image_dir / "a.jpg")
    init_ray(num_cpus=2, object_store_memory=300 * 2**20)
    one = {"num_replicas": 1, "num_cpus": 0.25, "num_gpus": 0}
    config = ServeConfig.model_validate({
        "http": {"host": "127.0.0.1", "port": _free_port()},
        "limits": {"max_pixels": 200_000, "max_request_bytes": 1_000_000, "max_classes": 20, "max_name_chars": 40,
                   "image_uri_prefixes": [f"{image_dir}/", "http://127.0.0.1:9/public/"]},
        "batching": {"max_batch_requests": 4, "batch_wait_timeout_s": 0.01},
        "ingress": one, "proposer": one, "classifier": one,
    })
    return deploy(config)


def fuzz(url: str, cases: int, seed: int) -> collections.Counter:
    """Status counts of the generated requests, at least ``cases`` of them over all operations."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings

    schema = schemathesis.openapi.from_url(f"{url}openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    started = time.time()

    def run(operation, examples: int, round_seed: int) -> None:
        @hypothesis_seed(round_seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def send(case) -> None:
            response = case.call(base_url=url.rstrip("/"), timeout=120)
            statuses[response.status_code] += 1
            if response.status_code >= 500 and len(failures) < 5:
                failures.append(f"{operation.label} -> {response.status_code}: {response.text[:300]}")
            total = sum(statuses.values())
            if total % 250 == 0:
                print(f"  {total} requests, {time.time() - started:.0f}s, statuses {dict(sorted(statuses.items()))}",
                      flush=True)

        send()

    round_seed = seed
    while sum(statuses.values()) < cases:  # small operations (GET /healthz) run out of distinct examples
        before = sum(statuses.values())
        for operation in operations:
            run(operation, max(1, cases // len(operations)), round_seed)
        round_seed += 1
        if sum(statuses.values()) == before:
            break
    for line in failures:
        print(f"  server error: {line}")
    return statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="at least this many requests (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import httpx
    from ray import serve

    with tempfile.TemporaryDirectory() as folder:
        url = _deploy(Path(folder))
        print(f"service at {url}; fuzzing from {url}openapi.json", flush=True)
        started = time.time()
        try:
            statuses = fuzz(url, args.cases, args.seed)
            info = httpx.get(f"{url}v1/info", timeout=60).json()
        finally:
            serve.shutdown()
    counted = {int(k): v for k, v in info["requests_by_status"].items()}
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    counted_errors = sum(n for status, n in counted.items() if status >= 500)
    print(f"statuses: {dict(sorted(statuses.items()))}")
    print(f"fuzzed {sum(statuses.values())} requests in {time.time() - started:.0f}s: {server_errors} responses >= 500 "
          f"(/v1/info counts {counted_errors})")
    return 1 if server_errors or counted_errors else 0


if __name__ == "__main__":
    sys.exit(main())
