"""Issue 15, the command line: every bad input is one ``error:`` line, the run goes on where it can,
and nothing already written is lost (items 7-10, 12-14, 16) and issue 16.4 (relative paths in a job)."""

from __future__ import annotations

import copyreg
import io
import logging
import os
import pickle
import re
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
import torch

from ovseg_ray.cli import main


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """``main`` sets up logging once (``basicConfig``) on the stderr of its first caller; pytest swaps
    stderr per test, so drop the handler and let each test's ``main`` bind the current one."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    yield
    root.handlers[:] = saved


def _one_error(err: str) -> str:
    """The single ``error:`` line of a command's stderr (log lines may precede it; no traceback).
    Python's reports of log handlers that an earlier test's captured stderr left closed are pytest's
    doing, not the command's: they are left out."""
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", err, flags=re.DOTALL)
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def image(synth_dataset) -> str:
    return str(synth_dataset / "images" / "000000000001.jpg")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_segment_records_clashing_names_folders_and_missing_files_and_goes_on(tmp_path, synth_dataset, capsys):
    """Items 7 and 16: a name another input already took, a folder and a missing file are each an error
    line; the first x.* is kept intact; non-zero exit at the end."""
    inputs = []
    for folder, name in (("a", "x.jpg"), ("b", "x.jpg"), ("c", "x.png")):
        (tmp_path / folder).mkdir()
        shutil.copy(synth_dataset / "images" / f"00000000000{len(inputs) + 1}.jpg", tmp_path / folder / name)
        inputs.append(str(tmp_path / folder / name))
    reference = tmp_path / "reference"
    assert main(["segment", inputs[0], "--classes", "sky,car", "--out", str(reference)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    argv = ["segment", *inputs, str(tmp_path / "a"), str(tmp_path / "missing.jpg"), "--classes", "sky,car",
            "--out", str(out)]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    errors = _error_lines(printed)
    assert errors[:2] == [f"error: {inputs[1]}: outputs would overwrite those of {inputs[0]} (same name)",
                          f"error: {inputs[2]}: outputs would overwrite those of {inputs[0]} (same name)"]
    assert errors[2:] == [f"error: expected a file, found a directory: {tmp_path / 'a'}",
                          f"error: file not found: {tmp_path / 'missing.jpg'}"]
    assert "segmented 1 of 5 images" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_repeated_class_names_are_refused_by_segment_and_segment_batch(tmp_path, image, capsys):
    """Item 8: the service's rule (a 422 there) everywhere a vocabulary is given."""
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n dog\n")
    commands = [
        ["segment", image, "--classes", "dog,cat,dog", "--out", str(tmp_path / "o")],
        ["segment", image, "--classes-file", str(names), "--out", str(tmp_path / "o")],
        ["segment-batch", "--input", str(Path(image).parent), "--classes", "dog,cat, dog", "--out", str(tmp_path / "b")],
        ["segment-batch", "--input", str(Path(image).parent), "--classes-file", str(names), "--out", str(tmp_path / "b")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == "error: class name #2 ('dog') repeats class name #0\n", argv
    assert main(["segment", image, "--classes", "others", "--mode", "demo", "--out", str(tmp_path / "o")]) == 2
    assert "class name #1 ('others') repeats class name #0" in capsys.readouterr().err  # demo appends "others"
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_synth_writes_to_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch, capsys):
    """Item 9: ``synth --out s3://...`` writes the dataset there, not a local folder named ``s3:``."""
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", str(tmp_path / "local"), "--images", "2", "--seed", "5"]) == 0
    assert main(["synth", "--out", f"{s3_bucket}/data", "--images", "2", "--seed", "5"]) == 0
    assert f'"out": "{s3_bucket}/data"' in capsys.readouterr().out
    assert not (tmp_path / "s3:").exists()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    local = {str(p.relative_to(tmp_path / "local")): p.read_bytes() for p in (tmp_path / "local").rglob("*") if p.is_file()}
    remote = {key.split("/data/", 1)[1]: fs.cat(key) for key in fs.find(f"{s3_bucket[5:]}/data")}
    assert remote == local and "annotations/captions.json" in remote


def test_out_pointing_at_an_existing_file_is_a_message(tmp_path, image, capsys):
    """Item 13: segment, segment-batch and synth name the file instead of a traceback."""
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for argv, field in ((["segment", image, "--classes", "sky", "--out", str(taken)], "--out"),
                        (["segment-batch", "--input", str(Path(image).parent), "--classes", "sky", "--out", str(taken)],
                         "out"),
                        (["synth", "--out", str(taken), "--images", "1"], "--out")):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == (f"error: {field} {taken} is an existing file, not a folder: give a folder "
                                           f"(it is created if missing)\n")
    assert taken.read_text() == "keep me"


def _torchscript_archive(path: Path, offset: int, shape: tuple[int, ...], stored: int) -> None:
    """A TorchScript-layout archive with one float tensor record (``shape`` at ``offset``) over a
    storage record of ``stored`` values, pickled as ``torch.jit.save`` does."""
    module = types.ModuleType("__torch__")

    class Model:  # pickled as __torch__.Model, the way TorchScript names its classes
        def __reduce__(self):
            return (copyreg.__newobj__, (Model,), {"weight": _Tensor()})  # NEWOBJ, then BUILD

    class _Storage:
        pass

    class _Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, offset, shape, tuple(_strides(shape)), False, OrderedDict()))

    Model.__module__, Model.__qualname__ = "__torch__", "Model"
    module.Model = Model
    storage = _Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", stored) if obj is storage else None

    buffer = io.BytesIO()
    sys.modules["__torch__"] = module
    try:
        Pickler(buffer, protocol=2).dump(Model())
    finally:
        del sys.modules["__torch__"]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/constants.pkl", pickle.dumps(()))
        archive.writestr("archive/code/__torch__.py", "")
        archive.writestr("archive/data/0", torch.arange(stored, dtype=torch.float32).numpy().tobytes())


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return strides


def test_torchscript_record_past_its_storage_is_named(tmp_path, capsys):
    """Item 13: ``convert`` of an archive whose tensor record points past its storage: a message."""
    from ovseg_ray.weights.readers import read_tensors

    good = tmp_path / "good.pt"
    _torchscript_archive(good, offset=2, shape=(2, 3), stored=8)
    assert read_tensors(str(good)).tensors["weight"].tolist() == [[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]
    bad = tmp_path / "bad.pt"
    _torchscript_archive(bad, offset=4, shape=(2, 3), stored=8)
    assert main(["convert", str(bad), str(tmp_path / "out.safetensors"), "--preset", "tiny"]) == 2
    assert capsys.readouterr().err == (f"error: TorchScript archive {bad}: a tensor record of shape [2, 3] at offset 4 "
                                       f"reaches value 10 of a storage record holding 8 (corrupt archive?)\n")


def test_files_that_are_no_checkpoint_are_named(tmp_path, image, capsys):
    """Item 14: a JPEG given to convert (also with --trust-pickle), a text or empty file as --weights."""
    text, empty = tmp_path / "notes.txt", tmp_path / "empty.pt"
    text.write_text("weights are elsewhere\n")
    empty.write_bytes(b"")
    expected = "Expected a safetensors file, a torch checkpoint (.pt/.pth, zip or pickle) or an OpenAI TorchScript archive"
    size = os.path.getsize(image)
    cases = [(["convert", image, str(tmp_path / "o.safetensors")], f"{image} is not a checkpoint: it is a JPEG image ({size} bytes)"),
             (["convert", image, str(tmp_path / "o.safetensors"), "--trust-pickle"], "it is a JPEG image"),
             (["segment", image, "--classes", "sky", "--weights", str(text), "--out", str(tmp_path / "s")],
              f"{text} is not a checkpoint: it is a text file (22 bytes)"),
             (["segment", image, "--classes", "sky", "--weights", str(empty), "--out", str(tmp_path / "s")],
              f"{empty} is not a checkpoint: it is an empty file (0 bytes)")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and expected in err, err


@pytest.fixture
def unreachable_s3(monkeypatch, s3_endpoint):
    """S3 behind a dead port (botocore tries once); s3fs's cached clients are dropped before and after."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_dead_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask the (absent) instance metadata service
    s3fs.S3FileSystem.clear_instance_cache()
    yield os.environ["AWS_ENDPOINT_URL"]
    s3fs.S3FileSystem.clear_instance_cache()


def _dead_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


def _s3_commands(tmp_path) -> dict[str, list[str]]:
    b = "s3://nowhere-bucket"
    return {
        "segment": ["segment", f"{b}/x.jpg", "--classes", "sky", "--out", str(tmp_path / "s")],
        "segment-batch": ["segment-batch", "--input", f"{b}/photos", "--classes", "sky", "--out", str(tmp_path / "b")],
        "mine": ["mine", "--images", f"{b}/images", "--captions", f"{b}/captions.json", "--output", f"{b}/mined"],
        "mine-preview": ["mine-preview", f"{b}/mined", "--out", str(tmp_path / "sheet.png")],
        "train-clip": ["train-clip", "--data.pairs", f"{b}/pairs", "--run.storage-path", f"{b}/runs"],
        "eval": ["eval", "--benchmarks", "ade20k_150", "--dataset-root", f"{b}/data", "--out", str(tmp_path / "e")],
        "serve": ["serve", "--model.weights", f"{b}/model.safetensors", "--http.port", str(_dead_port()),
                  *(arg for stage in ("ingress", "proposer", "classifier") for arg in (f"--{stage}.num-cpus", "0.1"))],
        "convert": ["convert", f"{b}/model.pth", str(tmp_path / "c.safetensors")],
        "synth": ["synth", "--out", f"{b}/data", "--images", "1"],
    }


def test_unreachable_s3_is_one_line_naming_uri_endpoint_and_cause(ray_session, unreachable_s3, tmp_path, capsys,
                                                                  monkeypatch):
    """Item 12, for every command: a dead endpoint, then no credentials at all."""
    for name, argv in _s3_commands(tmp_path).items():
        assert main(argv) == 2, name
        err = _one_error(capsys.readouterr().err)
        assert err.startswith("error: cannot reach s3://nowhere-bucket/"), (name, err)
        assert f"(endpoint {unreachable_s3}): cannot connect (EndpointConnectionError" in err, (name, err)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    for name in ("segment", "segment-batch", "train-clip", "convert", "synth"):
        s3fs.S3FileSystem.clear_instance_cache()
        assert main(_s3_commands(tmp_path)[name]) == 2, name
        assert "no credentials found (NoCredentialsError" in _one_error(capsys.readouterr().err), name


def test_train_clip_fails_with_the_count_when_no_pair_can_be_used(ray_session, synth_dataset, tmp_path, capsys):
    """Item 10: every pair's image missing: an error with the count and the reason, and no model."""
    from ovseg_ray.training.pair_batches import coco_instance_pairs

    pairs = coco_instance_pairs(str(synth_dataset))
    missing = [f"{tmp_path}/gone/{os.path.basename(uri)}" for uri in pairs.column("image_uri").to_pylist()]
    pairs = pairs.set_column(pairs.schema.get_field_index("image_uri"), "image_uri", [missing])
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    runs = tmp_path / "runs"
    argv = ["train-clip", "--data.pairs", str(tmp_path / "pairs.parquet"), "--optim.epochs", "2",
            "--optim.batch-size", "8", "--run.storage-path", str(runs), "--run.name", "nothing",
            "--run.cpus-per-worker", "0.5", "--data.preprocess-cpus", "0.5"]
    assert main(argv) == 2
    err = _one_error(capsys.readouterr().err)
    assert f"training stopped in epoch 1: all {pairs.num_rows} pairs were skipped, none could be used" in err
    assert f"{tmp_path}/gone/" in err and "no model was written" in err
    assert not list(runs.rglob("model.safetensors"))


def test_relative_output_paths_are_refused_inside_a_ray_job(tmp_path, image, monkeypatch, capsys):
    """Issue 16.4: inside ``ray job submit`` (Ray sets the marker) relative outputs would land in Ray's
    temporary working-dir copy; every command refuses them, naming the field, before any work."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.chdir(tmp_path)
    cases = {
        "output": ["mine", "--images", str(tmp_path), "--captions", "c.json", "--output", "runs/mined"],
        "run.storage_path": ["train-clip", "--data.pairs", "/data/pairs"],  # its default is relative
        "out": ["eval", "--benchmarks", "ade20k_150", "--dataset-root", "/data"],
        "--out": ["segment", image, "--classes", "sky", "--out", "seg"],
        "limits.image_uri_prefixes": ["serve", "--limits.image-uri-prefixes", "s3://ok/,images"],
    }
    for field, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {field} '"), err
        assert "is a relative path, and this runs inside a Ray job" in err and "s3:// URI" in err
    batch = ["segment-batch", "--input", str(Path(image).parent), "--classes", "sky", "--out", "batch"]
    assert main(batch) == 2 and "error: out 'batch' is a relative path" in capsys.readouterr().err
    for argv in (["train-maskformer", "--data.root", "/data"],  # the other Ray Train commands' defaults
                 ["pretrain-clip", "--data.images", "/data/images", "--data.captions", "/data/captions.json"]):
        assert main(argv) == 2, argv
        assert "error: run.storage_path 'runs/" in capsys.readouterr().err
    assert main(["reproduce", "--out", "runs/repro"]) == 2
    assert "error: out 'runs/repro' is a relative path" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir()]
