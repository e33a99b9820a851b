"""Issue 16 acceptance 2 and 4 (and issue 15.6 on the cluster path): the cluster user's commands against
a Ray head started here with ``ray start --head`` (its own ports and temp dir, stopped by the test).

The head's environment plays the node's: it holds the S3 credentials (a sentinel secret key) and the
checkout on PYTHONPATH, but no NLTK_DATA, which the job brings in ``--runtime-env-json``.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import s3fs
import yaml

from ray_head import RayHead, free_ports, start_head_retrying

REPO = Path(__file__).resolve().parent.parent
SENTINEL_SECRET = "sentinel-Secret-4f1c9e2a7b"


@pytest.fixture(scope="module")
def head(s3_endpoint):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET, "PYTHONPATH": str(REPO)}
    nltk_data = env.pop("NLTK_DATA")
    ray_head = start_head_retrying(env, num_cpus=4)  # logical CPUs: three serve stages of 1 CPU each
    ray_head.nltk_data = nltk_data
    yield ray_head
    ray_head.stop()


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(path) for path in root.rglob("*") if path.is_file() and not path.is_symlink()
            and needle in path.read_bytes()]


def test_mining_job_with_its_own_runtime_env_succeeds_and_writes_no_secret(head: RayHead, synth_dataset,
                                                                           s3_bucket):
    """``ray job submit --runtime-env-json '{"env_vars": {"NLTK_DATA": ...}}'`` used to fail ("Failed to
    merge the Job's runtime env"), since init_ray passed env_vars (AWS_* among them) of its own."""
    runtime_env = json.dumps({"env_vars": {"NLTK_DATA": head.nltk_data}})
    output = f"{s3_bucket}/mined"
    submitted = head.run(
        "ray", "job", "submit", "--address", head.dashboard, "--runtime-env-json", runtime_env, "--",
        "python", str(REPO / "jobs" / "mine_pairs.py"), "--images", f"{synth_dataset}/images",
        "--captions", f"{synth_dataset}/annotations/captions.json", "--output", output, "--max-images", "4",
        "--shard-size", "2", "--proposals.num-cpus", "0.5", "--matching.num-cpus", "0.5",
        "--proposals.batch-size", "2", "--matching.batch-size", "2",
    )
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "succeeded" in logs and "mined " in logs and f"-> {output}" in logs, logs[-4000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    shards = fs.glob(f"{output.removeprefix('s3://')}/pairs/*.parquet")
    assert len(shards) == 2, shards
    assert SENTINEL_SECRET not in logs
    assert _files_holding(Path(head.temp_dir), SENTINEL_SECRET) == []


def _wait_for_app(head: RayHead, name: str, timeout: float = 420) -> dict:
    deadline = time.time() + timeout
    while True:
        status = yaml.safe_load(head.run("serve", "status", "--address", head.dashboard).stdout or "{}") or {}
        app = (status.get("applications") or {}).get(name) or {}
        if app.get("status") == "RUNNING":
            return status
        assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), app
        assert time.time() < deadline, status
        time.sleep(3)


def test_serve_build_output_deploys_with_serve_deploy(head: RayHead, synth_dataset, tmp_path):
    """Issue 16.6 / acceptance 4: ``serve build ovseg_ray.serving.app:app`` writes a deploy file that
    ``serve deploy`` runs on the head as it is, but for the HTTP port (a free one, on 127.0.0.1)."""
    built = tmp_path / "built.yaml"
    result = head.run("serve", "build", "ovseg_ray.serving.app:app", "-o", str(built))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(built.read_text())
    (app,) = config["applications"]
    assert {entry["name"] for entry in app["deployments"]} == {"OVSegIngress", "MaskProposer", "RegionClassifier"}
    (port,) = free_ports(1)
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    built.write_text(yaml.safe_dump(config))
    deployed = head.run("serve", "deploy", "--address", head.dashboard, str(built))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    _wait_for_app(head, app["name"])
    image = (synth_dataset / "images" / "000000000001.jpg").read_bytes()
    body = json.dumps({"image_base64": base64.b64encode(image).decode(), "classes": ["sky", "grass"],
                       "outputs": ["rle"]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/segment", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert response.status == 200
    assert answer["classes"] == ["sky", "grass"] and answer["height"] > 0, answer.keys()
    assert head.run("serve", "shutdown", "--address", head.dashboard, "-y").returncode == 0
