"""Zero-shot evaluation: sweep == segment, end to end on Ray with 1 and 2 actors, bad labels skipped."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ovseg_ray.evaluation import metrics
from ovseg_ray.evaluation.config import ComputeConfig
from ovseg_ray.cli import main
from ovseg_ray.config import ConfigError, load_config
from ovseg_ray.data.benchmarks import class_list
from ovseg_ray.data.images import load_image
from ovseg_ray.data.readers import BenchmarkReader
from ovseg_ray.evaluation.report import markdown_table
from ovseg_ray.evaluation.benchmark import EvalConfig, settings_for
from ovseg_ray.evaluation.engine import run_evaluation
from ovseg_ray.inference import Segmenter

ADE_DIR = "ADEChallengeData2016"
SWEEP_LAMBDAS = [0.0, 0.7, 1.0]


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model)


def reference_confusion(segmenter, root, stems=None, lam=0.7, threshold=0.4) -> np.ndarray:
    """Summed confusion matrix computed here, in-process, with Segmenter.segment and the reader."""
    reader = BenchmarkReader("ade20k_150", str(root))
    classes = class_list("ade20k_150").prompt_names()
    total = np.zeros((150, 150), np.int64)
    for sample in reader.samples():
        if stems is not None and sample.stem not in stems:
            continue
        image = load_image(sample.image_uri)
        pred = segmenter.segment(image, classes, lam=lam, mask_threshold=threshold).labels
        total += metrics.confusion_matrix(pred, reader.read_label(sample.label_uri), 150)
    return total


def test_sweep_reuses_stages_and_equals_segment(segmenter, synth_dataset):
    image = load_image(str(synth_dataset / ADE_DIR / "images/validation/ADE_val_00000001.jpg"))
    classes = ["sky", "wall", "grass", "water", "sand", "road", "floor", "ball", "car", "boat"]
    settings = [(0.7, 0.4), (0.0, 0.4), (0.5, 0.3), (1.0, 0.3), (0.7, 0.3), (0.0, 0.6)]
    calls = {"propose": 0, "classify_regions": 0}
    for name in calls:  # count stage calls on the real methods
        original = getattr(segmenter, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(segmenter, name, counted)
    try:
        swept = segmenter.segment_settings(image, classes, settings)
    finally:
        for name in calls:
            delattr(segmenter, name)
    # one MaskFormer pass; CLIP regions once per threshold that has a lambda > 0 (0.4 and 0.3, not 0.6)
    assert calls == {"propose": 1, "classify_regions": 2}
    assert len(swept) == len(settings)
    for (lam, threshold), labels in zip(settings, swept):
        expected = segmenter.segment(image, classes, lam=lam, mask_threshold=threshold).labels
        assert labels.shape == image.shape[:2] and np.array_equal(labels, expected), (lam, threshold)
    single = segmenter.segment_settings(image, classes, [(0.5, 0.3)])
    assert np.array_equal(single[0], swept[2])


def test_official_defaults_and_sweep_grid():
    """lambda per benchmark as the official evaluation commands: 0.7 ADE, 0.6 Pascal Context, 0.45 VOC."""
    config = EvalConfig(dataset_root="x")
    assert settings_for(config, "ade20k_150", 0.4) == [(0.7, 0.4)]
    assert settings_for(config, "ade20k_847", 0.4) == [(0.7, 0.4)]
    for benchmark in ("pascal_context_59", "pascal_context_459"):
        assert settings_for(config, benchmark, 0.4) == [(0.6, 0.4)]
    assert settings_for(config, "pascal_voc_20", 0.5) == [(0.45, 0.5)]
    config = EvalConfig(dataset_root="x", ensemble_lambda=0.5, mask_threshold=0.3,
                        sweep={"lambdas": [0.5, 0.8], "mask_thresholds": [0.3, 0.5]})
    assert settings_for(config, "pascal_voc_20", 0.4) == [(0.5, 0.3), (0.5, 0.5), (0.8, 0.3), (0.8, 0.5)]


def test_class_names_and_seen_split():
    from ovseg_ray.evaluation.benchmark import class_names_for, seen_indices

    full = class_names_for("ade20k_847", "full")
    assert len(full) == len(set(full)) == 847 and full[1] == "building, edifice"
    clean = class_names_for("ade20k_847", "clean")
    assert clean[1] == "building" and len(set(clean)) < 847
    config = EvalConfig(dataset_root="x", seen_classes=["Sky", "building, edifice", "window"])
    assert seen_indices(config, "ade20k_150") == [1, 2, 8]  # "window " (trailing space) matches
    assert seen_indices(EvalConfig(dataset_root="x"), "ade20k_150") is None


def test_config_errors_name_the_field(tmp_path, capsys):
    assert main(["eval", "--benchmarks", "ade20k_999", "--dataset-root", str(tmp_path)]) == 2
    assert "benchmarks.0" in capsys.readouterr().err
    assert main(["eval", "--compute.max-actors", "0", "--dataset-root", str(tmp_path)]) == 2
    assert "compute.max_actors" in capsys.readouterr().err
    assert main(["eval", "--sweep.mask-thresholds", "0.4,1.5", "--dataset-root", str(tmp_path)]) == 2
    assert "sweep.mask_thresholds" in capsys.readouterr().err
    assert main(["eval", "--seen-classes", "skyy", "--dataset-root", str(tmp_path)]) == 2
    assert "seen_classes: ['skyy']" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="split_files"):
        load_config(EvalConfig, overrides={"split_files": {"coco": "x.txt"}})
    with pytest.raises(ConfigError, match=r"compute: .*max_actors \(1\) must be >= min_actors \(2\)"):
        load_config(EvalConfig, overrides={"compute.min_actors": 2})


def test_markdown_table_follows_paper_columns():
    result = {"metrics": {"mIoU": 12.345, "pAcc": 50.0, "mAcc": 20.0}, "best": None, "lambda": 0.6,
              "mask_threshold": 0.4, "counts": {"evaluated": 3, "skipped": 1}}
    table = markdown_table({"name": "mine", "benchmarks": {"pascal_context_59": result}}, paper_rows=True)
    lines = table.splitlines()
    assert lines[2] == "| Model | A-847 | PC-459 | A-150 | PC-59 | PAS-20 |"
    assert "| OVSeg Swin-B + ViT-L/14 (paper) | 9.0 | 12.4 | 29.6 | 55.7 | 94.5 |" in lines
    assert "| **mine** | - | - | - | 12.3 | - |" in lines
    assert "| PC-59 | 12.3 | 50.0 | 20.0 | - | 0.6 | 0.4 | 3 | 1 | - |" in lines


def _config(root, out, actors: int) -> EvalConfig:
    return EvalConfig(
        dataset_root=str(root), out=str(out), benchmarks=["ade20k_150"],
        compute=ComputeConfig(min_actors=actors, max_actors=actors, batch_size=1, num_cpus=0.5),
        sweep={"lambdas": SWEEP_LAMBDAS}, seen_classes_from="coco_stuff_171",
    )


@pytest.mark.slow
def test_end_to_end_one_and_two_actors(ray_session, synth_dataset, segmenter, tmp_path, monkeypatch):
    # Start dispatching only once the whole pool is up, so both actors of the second run get images.
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    one = run_evaluation(_config(synth_dataset, tmp_path / "one", actors=1))
    two = run_evaluation(_config(synth_dataset, tmp_path / "two", actors=2))

    for run, actors in ((one, 1), (two, 2)):
        result = run["benchmarks"]["ade20k_150"]
        assert result["counts"]["actors"] == actors
        assert result["counts"]["images"] == result["counts"]["evaluated"] == 4
        assert result["counts"]["skipped"] == 0 and result["skipped"] == []

    def numbers(run):
        result = dict(run["benchmarks"]["ade20k_150"])
        result["counts"] = {k: v for k, v in result["counts"].items() if k != "actors"}
        return result

    assert numbers(one) == numbers(two)
    conf_one = np.load(tmp_path / "one/ade20k_150/confusion.npz")
    conf_two = np.load(tmp_path / "two/ade20k_150/confusion.npz")
    assert np.array_equal(conf_one["confusion"], conf_two["confusion"])
    assert conf_one["settings"].tolist() == [[0.7, 0.4], [0.0, 0.4], [1.0, 0.4]]

    # The reported setting (paper default lambda 0.7, preset threshold 0.4) against an in-process reference.
    reference = reference_confusion(segmenter, synth_dataset)
    assert np.array_equal(conf_one["confusion"][0], reference)
    gt_pixels = sum(int((np.asarray(Image.open(p)) != 255).sum())
                    for p in (synth_dataset / ADE_DIR / "annotations_detectron2/validation").glob("*.png"))
    assert reference.sum() == gt_pixels
    result = one["benchmarks"]["ade20k_150"]
    expected = metrics.summarize(reference, class_list("ade20k_150").prompt_names(),
                                 seen=[i for i, c in enumerate(class_list("ade20k_150").clean_classes)
                                       if c in set(class_list("coco_stuff_171").clean_classes)])
    assert result["metrics"] == expected["metrics"]
    assert result["per_class_iou"] == expected["per_class_iou"]
    assert result["counts"]["labelled_pixels"] == gt_pixels
    assert {"mIoU_seen", "mIoU_unseen", "hIoU"} <= set(result["metrics"])
    assert "excluded" in result["convention"]
    assert [(s["lambda"], s["mask_threshold"]) for s in result["sweep"]] == [(0.7, 0.4), (0.0, 0.4), (1.0, 0.4)]
    best = max(result["sweep"], key=lambda s: s["mIoU"])
    assert result["best"]["mIoU"] == best["mIoU"]

    # Files: results.json (whole run and per benchmark), the table, the chart.
    out = tmp_path / "one"
    assert json.loads((out / "results.json").read_text())["benchmarks"]["ade20k_150"] == result
    assert json.loads((out / "ade20k_150/results.json").read_text()) == result
    table = (out / "table.md").read_text()
    assert f"| **tiny (shipped weights)** | - | - | {result['metrics']['mIoU']:.1f} | - | - |" in table
    with Image.open(io.BytesIO((out / "ade20k_150/per_class_iou.png").read_bytes())) as chart:
        assert chart.format == "PNG" and chart.width > 300 and chart.height > 100


@pytest.mark.slow
def test_corrupt_and_missing_labels_are_skipped_and_counted(ray_session, synth_dataset, segmenter, tmp_path,
                                                            capsys):
    root = tmp_path / "data"
    shutil.copytree(synth_dataset / ADE_DIR, root / ADE_DIR)
    labels = root / ADE_DIR / "annotations_detectron2/validation"
    (labels / "ADE_val_00000002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (labels / "ADE_val_00000003.png").unlink()
    config = {"dataset_root": str(root), "out": str(tmp_path / "eval"), "benchmarks": ["ade20k_150"],
              "compute": {"max_actors": 1, "batch_size": 2, "num_cpus": 0.5}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["eval", "--config", str(path), "--paper-rows", "false"]) == 0
    printed = capsys.readouterr().out
    assert "ade20k_150: mIoU" in printed and "over 2 of 4 images, 2 skipped" in printed

    result = json.loads((tmp_path / "eval/ade20k_150/results.json").read_text())
    assert result["counts"]["images"] == 4 and result["counts"]["evaluated"] == 2
    assert result["counts"]["skipped"] == 2 and result["counts"]["skipped_by_stage"] == {"label": 2}
    reasons = {Path(s["label_uri"]).name: s["reason"] for s in result["skipped"]}
    assert "cannot decode" in reasons["ADE_val_00000002.png"] and str(labels) in reasons["ADE_val_00000002.png"]
    assert "not found" in reasons["ADE_val_00000003.png"]
    assert "OVSeg" not in (tmp_path / "eval/table.md").read_text()
    reference = reference_confusion(segmenter, root, stems={"ADE_val_00000001", "ADE_val_00000004"})
    confusion = np.load(tmp_path / "eval/ade20k_150/confusion.npz")["confusion"]
    assert confusion.shape == (1, 150, 150) and np.array_equal(confusion[0], reference)
