"""Issue 15.6 / acceptance 3: every S3-touching command, run with a sentinel AWS secret key on a Ray it
starts itself, writes that secret nowhere: not in its output, not in the files it wrote (local or S3),
not in Ray's session folder (``runtime_env_agent.log`` held it when init_ray forwarded ``AWS_*``
through ``runtime_env.env_vars``).

The commands run in one fresh Python process (the test session's Ray is shared and started by the
tests themselves), in order, each on what the previous ones wrote to S3; the first to need Ray
starts it, the others reuse it. The cluster path (a head whose node holds the credentials) is
checked in test_local_head.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import s3fs

REPO = Path(__file__).resolve().parent.parent
SENTINEL_SECRET = "sentinel-Secret-0b7d3e91c5"

RUN_COMMANDS = """
import json, sys
from ovseg_ray.cli import main
for name, argv in json.loads(sys.argv[1]):
    print(f"== {name}: exit {main(argv)}", flush=True)
"""


def _commands(bucket: str, local: Path) -> list[tuple[str, list[str]]]:
    actors = ("--compute.min-actors", "1", "--compute.max-actors", "1", "--compute.num-cpus", "0.5",
              "--compute.batch-size", "1")
    return [
        ("synth", ["synth", "--out", f"{bucket}/data", "--images", "4", "--eval-images", "2"]),
        ("mine", ["mine", "--images", f"{bucket}/data/images", "--captions", f"{bucket}/data/annotations/captions.json",
                  "--output", f"{bucket}/mined", "--shard-size", "2", "--proposals.num-cpus", "0.5",
                  "--matching.num-cpus", "0.5", "--proposals.batch-size", "2", "--matching.batch-size", "2"]),
        ("mine-preview", ["mine-preview", f"{bucket}/mined", "--out", str(local / "sheet.png")]),
        ("train-clip", ["train-clip", "--data.pairs", f"{bucket}/mined/pairs", "--run.storage-path", f"{bucket}/runs",
                        "--run.name", "r", "--optim.epochs", "1", "--optim.batch-size", "2",
                        "--run.cpus-per-worker", "0.5", "--data.preprocess-cpus", "0.5", "--run.log-every-steps", "0"]),
        ("eval", ["eval", "--benchmarks", "ade20k_150", "--dataset-root", f"{bucket}/data", "--out", f"{bucket}/eval",
                  *actors]),
        ("segment-batch", ["segment-batch", "--input", f"{bucket}/data/images", "--classes", "sky,grass",
                           "--out", f"{bucket}/segmented", *actors]),
        ("segment", ["segment", f"{bucket}/data/images/000000000001.jpg", "--classes", "sky,grass",
                     "--out", str(local / "segment")]),
    ]


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(path) for path in root.rglob("*")
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes()]


@pytest.mark.slow
def test_no_command_writes_the_secret_anywhere(s3_endpoint, s3_bucket, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ovr-sec-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET, "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    commands = _commands(s3_bucket, local)
    try:
        done = subprocess.run([sys.executable, "-c", RUN_COMMANDS, json.dumps(commands)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=1200)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        for name, _ in commands:
            assert f"== {name}: exit 0" in done.stdout, output[-4000:]
        assert SENTINEL_SECRET not in output
        sessions = list(ray_tmp.glob("ray/session_*"))
        assert sessions and list(ray_tmp.glob("ray/session_*/logs/runtime_env_agent.log")), sessions
        needle = SENTINEL_SECRET.encode()
        assert _files_holding(ray_tmp, needle) == []
        assert _files_holding(tmp_path, needle) == []
        fs = s3fs.S3FileSystem()
        fs.invalidate_cache()
        written = fs.find(s3_bucket.removeprefix("s3://"))
        assert any("/runs/r/" in key for key in written) and any("/segmented/" in key for key in written)
        assert [key for key in written if needle in fs.cat_file(key)] == []
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)
