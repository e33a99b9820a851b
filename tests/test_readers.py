"""The five benchmark readers on small fixtures written in each prepared format (local and s3://)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovseg_ray.data import storage
from ovseg_ray.data.images import ImageDecodeError
from ovseg_ray.data.readers import BENCHMARKS, IGNORE_INDEX, BenchmarkReader, benchmark_layout, decode_label

# (benchmark, classes, ignore value, label file type, PIL mode the file must be stored in)
FORMATS = [
    ("ade20k_150", 150, 255, "png", "L"),
    ("ade20k_847", 847, 65535, "tif", "I;16"),
    ("pascal_context_59", 59, 255, "png", "L"),
    ("pascal_context_459", 459, 65535, "tif", "I;16"),
    ("pascal_voc_20", 20, 255, "png", "L"),
]


def _label_bytes(array: np.ndarray, ext: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF" if ext == "tif" else "PNG")
    return buffer.getvalue()


def _jpeg(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_fixture(root: str, benchmark: str, stems=("b_001", "a_002"), seed: int = 0) -> dict[str, np.ndarray]:
    """Images + label maps in the benchmark's prepared layout under ``root``; returns the raw labels."""
    layout = benchmark_layout(benchmark)
    dtype = np.uint8 if layout.label_bits == 8 else np.uint16
    rng = np.random.default_rng(seed)
    written = {}
    for i, stem in enumerate(stems):
        h, w = 12 + i, 17
        raw = rng.integers(0, layout.num_classes, (h, w)).astype(dtype)
        raw[0, 0], raw[-1, -1] = layout.num_classes - 1, 0  # both ends of the class range
        raw[rng.random((h, w)) < 0.2] = layout.ignore_label
        raw[1, 1] = layout.ignore_label
        storage.write_bytes(storage.join(root, layout.gt_dir, f"{stem}.{layout.gt_ext}"),
                            _label_bytes(raw, layout.gt_ext))
        storage.write_bytes(storage.join(root, layout.image_dir, f"{stem}.jpg"), _jpeg(h, w, i))
        written[stem] = raw
    return written


@pytest.mark.parametrize("benchmark,num_classes,ignore,ext,mode", FORMATS)
def test_reader_reads_its_format_and_maps_ignore(tmp_path, benchmark, num_classes, ignore, ext, mode):
    raw = write_fixture(str(tmp_path), benchmark)
    layout = benchmark_layout(benchmark)
    assert (layout.num_classes, layout.ignore_label, layout.gt_ext) == (num_classes, ignore, ext)
    label_file = tmp_path / layout.gt_dir / f"b_001.{ext}"
    with Image.open(label_file) as stored:  # the fixture really is in the benchmark's format
        assert stored.format == ("TIFF" if ext == "tif" else "PNG") and stored.mode == mode

    reader = BenchmarkReader(benchmark, str(tmp_path))
    samples = reader.samples()
    assert [s.stem for s in samples] == ["a_002", "b_001"]
    assert samples[1].image_uri == str(tmp_path / layout.image_dir / "b_001.jpg")
    assert samples[1].label_uri == str(label_file)
    assert len(reader.class_list.classes) == num_classes

    for sample in samples:
        labels = reader.read_label(sample.label_uri)
        expected = raw[sample.stem].astype(np.int32)
        expected[expected == ignore] = IGNORE_INDEX
        assert labels.dtype == np.int32 and labels.shape == raw[sample.stem].shape
        assert np.array_equal(labels, expected)
        assert labels[1, 1] == IGNORE_INDEX and labels.max() == num_classes - 1 and labels.min() == IGNORE_INDEX


def test_layouts_follow_the_prepared_folders():
    assert benchmark_layout("ade20k_150").gt_dir == "ADEChallengeData2016/annotations_detectron2/validation"
    assert benchmark_layout("ade20k_847").image_dir == "ADE20K_2021_17_01/images_detectron2/validation"
    assert benchmark_layout("pascal_context_459").gt_dir == "VOCdevkit/VOC2010/annotations_detectron2/pc459_val"
    assert benchmark_layout("pascal_context_59").image_dir == "VOCdevkit/VOC2010/JPEGImages"
    assert benchmark_layout("pascal_voc_20").gt_dir == "VOCdevkit/VOC2012/annotations_detectron2/val"
    assert [benchmark_layout(b).label_bits for b in BENCHMARKS] == [16, 16, 8, 8, 8]
    with pytest.raises(ValueError, match="unknown benchmark 'coco'"):
        benchmark_layout("coco")


def test_voc_background_is_ignored_not_a_class(tmp_path):
    # Prepared VOC-20: raw background 0 became 255; value 0 is aeroplane.
    layout = benchmark_layout("pascal_voc_20")
    raw = np.array([[255, 0, 19], [255, 255, 5]], np.uint8)
    labels = decode_label(_label_bytes(raw, "png"), layout)
    assert labels.tolist() == [[-1, 0, 19], [-1, -1, 5]]
    assert BenchmarkReader("pascal_voc_20", str(tmp_path)).class_list.classes[0] == "aeroplane"


def test_pascal_index_comes_from_labels_ade_from_images(tmp_path):
    # Pascal: JPEGImages holds every image of the year; only labelled ones are in the split.
    write_fixture(str(tmp_path), "pascal_context_59", stems=("x1", "x2"))
    storage.write_bytes(str(tmp_path / "VOCdevkit/VOC2010/JPEGImages/unlabelled.jpg"), _jpeg(5, 5, 9))
    assert [s.stem for s in BenchmarkReader("pascal_context_59", str(tmp_path)).samples()] == ["x1", "x2"]
    # ADE: the image folder is the split; an image without its label is a sample whose label is missing.
    write_fixture(str(tmp_path), "ade20k_150", stems=("ADE_val_1", "ADE_val_2"))
    os.remove(tmp_path / "ADEChallengeData2016/annotations_detectron2/validation/ADE_val_2.png")
    reader = BenchmarkReader("ade20k_150", str(tmp_path))
    samples = reader.samples()
    assert [s.stem for s in samples] == ["ADE_val_1", "ADE_val_2"]
    with pytest.raises(FileNotFoundError, match="ADE_val_2.png"):
        reader.read_label(samples[1].label_uri)
    assert [s.stem for s in BenchmarkReader("ade20k_150", str(tmp_path), limit=1).samples()] == ["ADE_val_1"]


def test_split_file_fixes_the_sample_list(tmp_path):
    write_fixture(str(tmp_path), "pascal_voc_20", stems=("2007_000032", "2007_000033"))
    split = tmp_path / "val.txt"
    split.write_text("2007_000033\n\n2007_000099\n")
    samples = BenchmarkReader("pascal_voc_20", str(tmp_path), split_file=str(split)).samples()
    assert [s.stem for s in samples] == ["2007_000033", "2007_000099"]
    assert samples[1].label_uri.endswith("VOCdevkit/VOC2012/annotations_detectron2/val/2007_000099.png")


@pytest.mark.parametrize("benchmark,data,match", [
    ("pascal_context_459", _label_bytes(np.zeros((3, 3), np.uint8), "png"), "uint8 but pascal_context_459"),
    ("ade20k_150", _label_bytes(np.full((3, 3), 1000, np.uint16), "tif"), "uint16 but ade20k_150"),
    ("ade20k_150", _label_bytes(np.array([[3, 150], [200, 255]], np.uint8), "png"), r"outside 0..149.*\[150, 200\]"),
    ("ade20k_847", _label_bytes(np.array([[847, 65535]], np.uint16), "tif"), r"outside 0..846.*\[847\]"),
    ("ade20k_150", b"not an image at all", "cannot decode lbl.png"),
    ("ade20k_150", b"", "empty"),
    ("ade20k_150", _label_bytes(np.zeros((3, 3), np.uint8), "png")[:40], "cannot decode lbl.png"),
], ids=["8bit-for-459", "16bit-for-150", "out-of-range-150", "out-of-range-847", "garbage", "empty", "truncated"])
def test_bad_label_files_are_named(benchmark, data, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_label(data, benchmark_layout(benchmark), source="lbl.png")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ade20k_150: image folder not found: .*ADEChallengeData2016"):
        BenchmarkReader("ade20k_150", str(tmp_path)).samples()
    (tmp_path / "VOCdevkit/VOC2012/annotations_detectron2/val").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no label files \(.png\)"):
        BenchmarkReader("pascal_voc_20", str(tmp_path)).samples()


def test_synthetic_evaluation_split_is_ade150(synth_dataset):
    reader = BenchmarkReader("ade20k_150", str(synth_dataset))
    samples = reader.samples()
    assert [s.stem for s in samples] == [f"ADE_val_{i:08d}" for i in range(1, 5)]
    labels = reader.read_label(samples[0].label_uri)
    raw = np.asarray(Image.open(samples[0].label_uri))
    assert np.array_equal(labels == IGNORE_INDEX, raw == 255)
    assert set(np.unique(labels[labels >= 0])) <= set(range(150))


def test_reader_on_s3(s3_bucket):
    raw = write_fixture(f"{s3_bucket}/datasets", "pascal_context_459", stems=("2008_000002",))
    reader = BenchmarkReader("pascal_context_459", f"{s3_bucket}/datasets")
    samples = reader.samples()
    assert [s.label_uri for s in samples] == [
        f"{s3_bucket}/datasets/VOCdevkit/VOC2010/annotations_detectron2/pc459_val/2008_000002.tif"]
    assert samples[0].image_uri == f"{s3_bucket}/datasets/VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg"
    labels = reader.read_label(samples[0].label_uri)
    expected = raw["2008_000002"].astype(np.int32)
    expected[expected == 65535] = IGNORE_INDEX
    assert np.array_equal(labels, expected)
    assert Path(samples[0].image_uri).suffix == ".jpg" and storage.exists(samples[0].image_uri)
