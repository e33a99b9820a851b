"""Shared fixtures: one local Ray instance and one moto S3 server for the whole test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end each wait
# on a poll: a one-worker train-clip run took 21.5 s with it, 15.9 s at 0.25 s. Every Ray the tests
# start (in process or through the CLI) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto in server mode) on 127.0.0.1; AWS_* variables point at it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; returns its ``s3://name`` URI."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray instance (2 CPUs, capped object store) shared by every test that needs Ray."""
    import ray

    env = {k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL", "NLTK_DATA", "RAY_AUTH_MODE")}
    ray.init(
        num_cpus=2,
        num_gpus=0,
        object_store_memory=400 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
        # Keep up to 8 idle workers for 10 minutes (Ray: as many as CPUs, killed after 1 s): a worker that
        # has imported torch serves the next run's tasks and actors. Mining tests: 126 -> 90 worker
        # processes, 212 s -> 155 s; the suite ~4 % faster. Each idle worker holds ~800 MB.
        _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """The synthetic COCO-format dataset (12 images, 4 evaluation images), generated once."""
    from ovseg_ray.data.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(str(out), images=12, seed=7, eval_images=4)
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The model every engine builds by default (``tiny`` with its shipped weights)."""
    from ovseg_ray.models.ovseg import build_model

    return build_model("tiny", weights="default")


def mining_test_config(root, output: str, images: str | None = None, captions: str | None = None, **overrides):
    """Mining config for tests: tiny preset, 4-image shards, both pools plus loading fit 2 CPUs."""
    from ovseg_ray.mining.config import MiningConfig

    data = {
        "images": images or f"{root}/images",
        "captions": captions or f"{root}/annotations/captions.json",
        "output": output,
        "shard_size": 4,
        "proposals": {"batch_size": 2, "min_actors": 2, "max_actors": 2, "num_cpus": 0.25},
        "matching": {"batch_size": 3, "min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return MiningConfig.model_validate(data)


def _actor_classes() -> dict[str, str]:
    """Every actor Ray's control store knows of (alive or dead): id -> class name."""
    import ray._private.state

    return {actor_id: info["ActorClassName"] for actor_id, info in ray._private.state.actors().items()}


@pytest.fixture(scope="session")
def mined_pairs(ray_session, synth_dataset, tmp_path_factory):
    """The synthetic dataset mined once with the tiny preset: (MiningResult, output folder).

    ``result.new_actors`` lists the actors Ray started for the run. Training tests train on these
    pairs; mining tests check them.
    """
    from ovseg_ray.mining.pipeline import mine_pairs

    out = tmp_path_factory.mktemp("mined")
    before = _actor_classes()
    result = mine_pairs(mining_test_config(synth_dataset, str(out)))
    result.new_actors = sorted(name for actor_id, name in _actor_classes().items() if actor_id not in before)
    return result, out
