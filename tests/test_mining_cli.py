"""`mine` as a user meets it (issue 15): refused runs leave no trace, unreadable remote images are error
rows, an existing file as output and Ctrl-C are one-line messages, re-runs keep the speed figures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pytest

from ovseg_ray.config import ConfigError
from ovseg_ray.data.pair_store import OutputLayout
from ovseg_ray.mining.pipeline import mine_pairs
from ovseg_ray.mining.stages import prepare_images

from conftest import mining_test_config


def test_a_refused_run_writes_no_manifest(ray_session, synth_dataset, tmp_path):
    out = tmp_path / "mined"
    too_big = mining_test_config(synth_dataset, str(out), proposals={"num_cpus": 2.0})
    with pytest.raises(ConfigError, match="need"):
        mine_pairs(too_big)
    assert not (out / "manifest.json").exists()


def test_an_output_without_committed_shards_takes_new_settings(tmp_path):
    layout = OutputLayout(str(tmp_path / "mined"))
    layout.write_manifest({"shard_size": 4})
    layout.check_manifest({"shard_size": 8})  # nothing committed yet: the new settings are fine
    layout.write_manifest({"shard_size": 8})
    (tmp_path / "mined" / "shards").mkdir()
    (tmp_path / "mined" / "shards" / "shard-00000.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"other settings \(shard_size: 8 -> 4\)"):
        layout.check_manifest({"shard_size": 4})


def test_unreadable_remote_images_are_error_rows(s3_endpoint, monkeypatch):
    import s3fs

    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    rows = [{"shard": 0, "image_id": 1, "image_uri": "s3://Bad_Bucket!/x.jpg", "captions": ["A dog on a couch."]},
            {"shard": 0, "image_id": 2, "image_uri": "s3://bucket/x.jpg", "captions": ["A cat on a mat."]}]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        batch = prepare_images(pa.Table.from_pylist(rows), compounds=True, extra_blocklist=[], max_image_pixels=10**8)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert batch.column("error_stage").to_pylist() == ["load", "load"]
    reasons = batch.column("error_reason").to_pylist()
    assert reasons[0].startswith("unreadable image: s3://Bad_Bucket!/x.jpg: ParamValidationError: ")
    # the storage layer names the endpoint and the cause (issue 15's one-line S3 errors)
    assert reasons[1].startswith("unreadable image: s3://bucket/x.jpg: StorageUnreachableError: cannot reach "
                                 f"s3://bucket/x.jpg (endpoint http://127.0.0.1:{dead}")
    assert "EndpointConnectionError" in reasons[1]
    assert all("\n" not in reason for reason in reasons)


def test_output_that_is_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    from ovseg_ray.cli import main

    existing = tmp_path / "pairs.parquet"
    existing.write_bytes(b"not a folder")
    status = main(["mine", "--images", str(tmp_path), "--captions", str(tmp_path / "c.json"),
                   "--output", str(existing)])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: output {existing} is an existing file; give a folder (or s3:// prefix) for the mined pairs\n"
    assert existing.read_bytes() == b"not a folder"


def test_a_no_op_rerun_keeps_the_first_runs_figures(mined_pairs, synth_dataset, tmp_path):
    _, reference = mined_pairs
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    first = json.loads((out / "summary.json").read_text())
    assert first["this_run"]["images_processed"] == 12 and first["this_run"]["images_per_s"] > 0
    assert first["runs"] == [first["this_run"]]
    config = mining_test_config(synth_dataset, str(out))  # the fixture's settings: every shard is done
    again = mine_pairs(config).summary
    assert again["this_run"]["images_processed"] == 0 and again["this_run"]["shards_written"] == 0
    assert again["runs"] == first["runs"]  # the first run's rates survive the no-op re-run
    for key in ("pairs", "images_with_pairs", "errors", "shards_done", "complete"):
        assert again[key] == first[key]
    assert json.loads((out / "summary.json").read_text()) == again


def test_ctrl_c_says_what_was_committed_and_how_to_resume(ray_session, tmp_path):
    """A real SIGINT, as Ctrl-C in a terminal sends, to an ``ovseg-ray mine`` process (joined to the
    test session's Ray) once its first shard is committed. The child installs Python's own SIGINT
    handler, as a process started from a terminal has it: a test run launched in the background
    (``nohup ... &``) ignores SIGINT, the child inherits that and would never see the signal.
    24 images, one shard each: a 6-image run in the full suite had committed all 6 shards by the time
    the signal was handled (the commits come in bursts as the pipeline's output reaches the driver)."""
    import subprocess
    import sys

    from ovseg_ray.data.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(str(data), images=24, seed=7, eval_images=1)
    out = tmp_path / "mined"
    marker = out / "shards" / "shard-00000.json"
    argv = ["mine", "--images", str(data / "images"),
            "--captions", str(data / "annotations/captions.json"), "--output", str(out),
            "--shard-size", "1", "--proposals.num-cpus", "0.25",
            "--proposals.batch-size", "1", "--matching.num-cpus", "0.25", "--matching.batch-size", "1",
            "--address", ray_session.get_runtime_context().gcs_address]
    process = subprocess.Popen([sys.executable, "-c", "import signal, sys; from ovseg_ray.cli import main; "
                                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                                "sys.exit(main(sys.argv[1:]))", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    running = process.poll() is None
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert running, f"the run ended before the signal was sent (exit {process.returncode}): {err[-2000:]}"
    assert process.returncode == 130, err[-3000:]
    committed = len(OutputLayout(str(out)).completed_shards())
    assert 1 <= committed < 24
    assert err.strip().splitlines()[-1] == (
        f"interrupted: {committed} of 24 shards are committed in {out} ({committed} by this run); "
        f"re-run the same command to mine the other {24 - committed}")
    assert "Traceback" not in err
