"""``ovseg-ray synth`` then ``ovseg-ray segment`` (issue 2, acceptance 6) and the CLI's error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ovseg_ray.cli import main
from ovseg_ray.inference import SegmentationResult
from ovseg_ray.outputs import write_segmentation

CLASSES = "sky,wall,grass,water,sand,road,floor,ball,car,boat,bottle,clock,kite,red circle"


def _check_outputs(out_dir, stem: str, image_shape) -> dict:
    labels = np.asarray(Image.open(os.path.join(out_dir, f"{stem}.labels.png")))
    overlay = Image.open(os.path.join(out_dir, f"{stem}.overlay.png"))
    info = json.loads(open(os.path.join(out_dir, f"{stem}.json")).read())
    assert labels.shape == image_shape[:2]
    assert overlay.size[1] >= image_shape[0] and overlay.size[0] > image_shape[1]  # image plus legend
    assert info["height"] == image_shape[0] and info["width"] == image_shape[1]
    present = {info["classes"][i] for i in np.unique(labels)}
    assert set(info["rle"]) == present
    for name, rle in info["rle"].items():
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), labels == info["classes"].index(name)), name
    fractions = info["pixel_fractions"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    for index, name in enumerate(info["classes"]):
        assert fractions[name] == pytest.approx((labels == index).mean())
    return info


def test_synth_then_segment_writes_label_overlay_and_json(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images", "3", "--seed", "1"]) == 0
    images = sorted(str(p) for p in (data / "images").glob("*.jpg"))
    assert len(images) == 3
    out = tmp_path / "seg"
    assert main(["segment", *images, "--classes", CLASSES, "--preset", "tiny", "--out", str(out)]) == 0
    assert "segmented 3 of 3 images" in capsys.readouterr().out
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        info = _check_outputs(out, stem, np.asarray(Image.open(path)).shape)
        assert info["classes"] == CLASSES.split(",")


def test_outputs_with_several_classes_round_trip_through_rle(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(37, 51)).astype(np.int32)
    labels[:10] = 2
    image = rng.integers(0, 255, size=(37, 51, 3)).astype(np.uint8)
    result = SegmentationResult(labels, ["a", "b", "c", "d", "unused"], num_proposals=4, num_valid_regions=3)
    write_segmentation(str(tmp_path), "x", image, result)
    info = _check_outputs(tmp_path, "x", image.shape)
    assert set(info["rle"]) == {"a", "b", "c", "d"} and info["pixel_fractions"]["unused"] == 0.0


def test_classes_file_and_console_script(tmp_path, synth_dataset):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("sky\n\ngrass\n  sand  \n")
    image = str(synth_dataset / "images" / "000000000001.jpg")
    out = tmp_path / "out"
    script = os.path.join(os.path.dirname(sys.executable), "ovseg-ray")
    proc = subprocess.run([script, "segment", image, "--classes-file", str(classes_file), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = _check_outputs(out, "000000000001", np.asarray(Image.open(image)).shape)
    assert info["classes"] == ["sky", "grass", "sand"]


def test_clear_errors(tmp_path, synth_dataset, capsys):
    image = str(synth_dataset / "images" / "000000000001.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(open(image, "rb").read()[:300])
    assert main(["segment", str(corrupt), "--classes", "sky", "--out", str(tmp_path / "o")]) == 1
    assert f"cannot decode {corrupt}" in capsys.readouterr().out
    assert main(["segment", image, "--classes", " , ", "--out", str(tmp_path / "o")]) == 2
    assert "class" in capsys.readouterr().err
    assert main(["segment", image, "--classes", "sky", "--preset", "huge", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'huge'" in err and "tiny" in err
    assert main(["segment", image, "--out", str(tmp_path / "o")]) == 2
    assert "no classes given" in capsys.readouterr().err


def test_synth_is_deterministic_and_readable_by_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    for name in ("a", "b"):
        main(["synth", "--out", str(tmp_path / name), "--images", "4", "--seed", "3"])
    for rel in ("annotations/captions.json", "annotations/instances.json", "images/000000000002.jpg",
                "stuffthingmaps/000000000004.png",
                "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_00000001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    captions = COCO(str(tmp_path / "a" / "annotations" / "captions.json"))
    instances = COCO(str(tmp_path / "a" / "annotations" / "instances.json"))
    assert len(captions.getImgIds()) == 4
    assert all(len(captions.getAnnIds(imgIds=[i])) == 5 for i in captions.getImgIds())
    for ann in instances.loadAnns(instances.getAnnIds()):
        mask = instances.annToMask(ann)
        img = instances.loadImgs([ann["image_id"]])[0]
        assert mask.shape == (img["height"], img["width"]) and mask.sum() == ann["area"] > 0


def test_demo_mode_writes_unlabelled_pixels_and_refuses_lambda(tmp_path, synth_dataset, capsys):
    """``segment --mode demo``: the official demo inference; one name gets "others"; unlabelled = 255."""
    image_path = str(synth_dataset / "images" / "000000000001.jpg")
    out = tmp_path / "demo"
    assert main(["segment", image_path, "--classes", "boat", "--mode", "demo", "--out", str(out)]) == 0
    info = json.loads((out / "000000000001.json").read_text())
    labels = np.asarray(Image.open(out / "000000000001.labels.png"))
    assert info["classes"] == ["boat", "others"]
    assert set(np.unique(labels)) <= {0, 1, 255}
    assert info["unlabelled_fraction"] == pytest.approx((labels == 255).mean())
    for index, name in enumerate(info["classes"]):
        assert info["pixel_fractions"][name] == pytest.approx((labels == index).mean())
    capsys.readouterr()
    assert main(["segment", image_path, "--classes", "boat", "--mode", "demo", "--lambda", "0.5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lambda does not apply in mode demo" in err


def test_unlabelled_pixels_in_every_output_kind(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(-1, 3, size=(20, 30)).astype(np.int32)  # -1: unlabelled (demo inference)
    image = rng.integers(0, 255, size=(20, 30, 3)).astype(np.uint8)
    result = SegmentationResult(labels, ["a", "b", "c"], num_proposals=3, num_valid_regions=3)
    write_segmentation(str(tmp_path), "u", image, result)
    stored = np.asarray(Image.open(tmp_path / "u.labels.png"))
    assert np.array_equal(stored == 255, labels == -1) and np.array_equal(stored[labels >= 0], labels[labels >= 0])
    info = json.loads((tmp_path / "u.json").read_text())
    assert set(info["rle"]) == {"a", "b", "c"}
    assert info["unlabelled_fraction"] == pytest.approx((labels == -1).mean())
    overlay = np.asarray(Image.open(tmp_path / "u.overlay.png").convert("RGB"))[:20, :30]
    assert np.array_equal(overlay[labels == -1], image[labels == -1])  # unlabelled keeps the image's colour
