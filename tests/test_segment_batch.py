"""``segment-batch``: same files as ``ovseg-ray segment``, Parquet index, unreadable images listed,
re-runs skip finished images; from and to a folder and s3:// (moto server)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from ovseg_ray.evaluation.batch_segment import SegmentBatchConfig, check_run_record, resolve_classes
from ovseg_ray.cli import main
from ovseg_ray.data.images import decode_label_png
from ovseg_ray.data.pairs import decode_mask

CLASSES = "sky,wall,grass,water,sand,road,floor,ball,car,boat,bottle,clock,kite,star"
CLASS_LIST = CLASSES.split(",")
GOOD = ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg", "sub/000000000004.jpg"]
COMPUTE = ["--compute.min-actors", "2", "--compute.max-actors", "2", "--compute.num-cpus", "0.5",
           "--compute.batch-size", "1"]
KINDS = (".labels.png", ".overlay.png", ".json")


@pytest.fixture(scope="module")
def input_folder(synth_dataset, tmp_path_factory) -> Path:
    """Four generated images (one in a subfolder) and one corrupt JPEG."""
    folder = tmp_path_factory.mktemp("batch_input")
    for name in GOOD:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_dataset / "images" / Path(name).name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG, not decodable")
    return folder


@pytest.fixture(scope="module")
def reference(input_folder, tmp_path_factory) -> dict[str, bytes]:
    """What ``ovseg-ray segment`` writes for each good image: {stem + kind: bytes}."""
    out = tmp_path_factory.mktemp("segment_reference")
    images = [str(input_folder / name) for name in GOOD]
    assert main(["segment", *images, "--classes", CLASSES, "--preset", "tiny", "--device", "cpu",
                 "--out", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(files) == 3 * len(GOOD)
    return files


def _expected_names() -> dict[str, str]:
    """Batch output path (relative) -> the name ``segment`` gives the same image's output."""
    return {os.path.splitext(name)[0] + kind: Path(name).stem + kind for name in GOOD for kind in KINDS}


def _check_index(index: list[dict], out: str, input_root: str, read) -> None:
    assert sorted(row["image_uri"] for row in index) == sorted(f"{input_root}/{name}" for name in GOOD)
    for row in index:
        stem = os.path.splitext(row["image_uri"][len(input_root) + 1:])[0]
        assert row["stem"] == stem and row["json_uri"] == f"{out}/{stem}.json"
        labels = decode_label_png(read(row["label_png_uri"]))
        assert (row["height"], row["width"]) == labels.shape
        counts = np.bincount(labels.ravel(), minlength=len(CLASS_LIST))
        present = [CLASS_LIST[i] for i in np.flatnonzero(counts)]
        assert sorted(row["classes"]) == sorted(present)
        assert row["pixel_fractions"] == sorted(row["pixel_fractions"], reverse=True)
        for name, fraction, rle in zip(row["classes"], row["pixel_fractions"], row["rle_counts"]):
            index_of = CLASS_LIST.index(name)
            assert fraction == pytest.approx(counts[index_of] / labels.size)
            assert np.array_equal(decode_mask(rle, labels.shape), labels == index_of)


@pytest.mark.slow
def test_folder_matches_segment_lists_corrupt_and_resumes(ray_session, input_folder, reference, tmp_path,
                                                          capsys):
    out = tmp_path / "out"
    argv = ["segment-batch", "--input", str(input_folder), "--classes", CLASSES, "--out", str(out), *COMPUTE]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 segmented, 0 already done, 1 failed, of 5 images" in printed
    assert f"error: {input_folder}/broken.jpg: cannot decode" in printed

    for relative, segment_name in _expected_names().items():
        assert (out / relative).read_bytes() == reference[segment_name], relative
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {row["status"] for row in index} == {"segmented"}
    _check_index(index, str(out), str(input_folder), lambda uri: Path(uri).read_bytes())
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["image_uri"] for e in errors] == [str(input_folder / "broken.jpg")]
    assert "cannot decode" in errors[0]["reason"] and errors[0]["stem"] == "broken"

    # A re-run writes nothing new for finished images and rebuilds the same index from their JSON.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".png", ".json")}
    assert main(argv) == 0
    assert "0 segmented, 4 already done, 1 failed, of 5 images" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written} == written
    again = pq.read_table(out / "index.parquet").to_pylist()
    assert {row["status"] for row in again} == {"existing"}
    def by_uri(rows):
        return sorted(({**row, "status": ""} for row in rows), key=lambda row: row["image_uri"])

    assert by_uri(again) == by_uri(index)

    # An interrupted image (its JSON, written last, is missing) is segmented again, alone.
    (out / "sub/000000000004.json").unlink()
    assert main(argv) == 0
    assert "1 segmented, 3 already done, 1 failed" in capsys.readouterr().out
    assert (out / "sub/000000000004.json").read_bytes() == reference["000000000004.json"]

    # Another vocabulary into the same folder is refused instead of mixing outputs.
    other = [*argv[:4], "sky,grass", *argv[5:]]
    assert main(other) == 2
    assert "other settings (classes differ)" in capsys.readouterr().err

    # --overwrite with it, interrupted right after its start: the old outputs no longer count as
    # finished, so a plain re-run segments every image with the new vocabulary.
    config = SegmentBatchConfig(input=str(input_folder), out=str(out), classes=["sky", "grass"], overwrite=True)
    check_run_record(config, resolve_classes(config))  # what --overwrite does before segmenting
    assert "4 earlier outputs withdrawn" in capsys.readouterr().out
    assert not list(out.rglob("*.json")) and (out / "000000000002.labels.png").exists()
    assert main(other) == 0
    assert "4 segmented, 0 already done, 1 failed" in capsys.readouterr().out
    assert json.loads((out / "000000000002.json").read_text())["classes"] == ["sky", "grass"]
    assert main([*other, "--overwrite", "true"]) == 0  # same settings: nothing withdrawn, all redone
    printed = capsys.readouterr().out
    assert "withdrawn" not in printed and "4 segmented, 0 already done" in printed


@pytest.mark.slow
def test_s3_to_s3(ray_session, s3_bucket, s3_endpoint, input_folder, reference, capsys):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket = s3_bucket[len("s3://"):]
    for path in input_folder.rglob("*.jpg"):
        fs.pipe(f"{bucket}/photos/{path.relative_to(input_folder)}", path.read_bytes())
    out = f"{s3_bucket}/segmented"
    assert main(["segment-batch", "--input", f"{s3_bucket}/photos", "--classes", CLASSES, "--out", out,
                 *COMPUTE]) == 0
    assert "4 segmented, 0 already done, 1 failed, of 5 images" in capsys.readouterr().out

    fs.invalidate_cache()
    for relative, segment_name in _expected_names().items():
        assert fs.cat(f"{bucket}/segmented/{relative}") == reference[segment_name], relative
    with fs.open(f"{bucket}/segmented/index.parquet", "rb") as handle:
        index = pq.read_table(handle).to_pylist()
    _check_index(index, out, f"{s3_bucket}/photos", lambda uri: fs.cat(uri[len("s3://"):]))
    with fs.open(f"{bucket}/segmented/errors.parquet", "rb") as handle:
        errors = pq.read_table(handle).to_pylist()
    assert [e["image_uri"] for e in errors] == [f"{s3_bucket}/photos/broken.jpg"]
    assert "cannot decode" in errors[0]["reason"]


def test_bad_inputs_are_named(tmp_path, capsys):
    assert main(["segment-batch", "--input", str(tmp_path / "nowhere"), "--classes", "a", "--out",
                 str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["segment-batch", "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no classes given" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["segment-batch", "--input", str(tmp_path), "--classes", "a", "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["segment-batch", "--input", str(tmp_path), "--classes", "a", "--out", str(tmp_path)]) == 2
    assert "must differ from the input" in capsys.readouterr().err
    assert main(["segment-batch", "--input", str(tmp_path), "--classes", "a", "--out", "o",
                 "--compute.num-cpus", "0"]) == 2
    assert "compute.num_cpus" in capsys.readouterr().err
