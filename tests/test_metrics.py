"""Confusion-matrix metrics against brute-force per-class IoU and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ovseg_ray.evaluation import metrics
from ovseg_ray.data.readers import IGNORE_INDEX


def _random_maps(rng, num_classes: int, images: int, gt_classes: np.ndarray, pred_classes: np.ndarray):
    maps = []
    for _ in range(images):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        gt = rng.choice(gt_classes, size=(h, w)).astype(np.int32)
        gt[rng.random((h, w)) < 0.15] = IGNORE_INDEX
        pred = rng.choice(pred_classes, size=(h, w)).astype(np.int32)
        agree = rng.random((h, w)) < 0.4  # some correct pixels so IoUs are not all ~0
        pred[agree & (gt >= 0)] = gt[agree & (gt >= 0)]
        maps.append((pred, gt))
    return maps


def _brute_force_iou(maps, num_classes: int) -> dict[int, float]:
    """IoU per class from pixel sets pooled over all images; classes in neither set are left out."""
    ious = {}
    for c in range(num_classes):
        inter = union = 0
        for pred, gt in maps:
            valid = gt != IGNORE_INDEX
            inter += int(((pred == c) & (gt == c) & valid).sum())
            union += int((((pred == c) | (gt == c)) & valid).sum())
        if union:
            ious[c] = inter / union
    return ious


@pytest.mark.parametrize("num_classes", [150, 847])
def test_summed_confusion_miou_equals_brute_force(num_classes):
    rng = np.random.default_rng(num_classes)
    # Ground truth uses a subset of the classes, predictions another overlapping subset, so some
    # classes are absent from both (excluded), some only predicted (IoU 0, counted).
    gt_classes = rng.choice(num_classes, size=num_classes // 3, replace=False)
    pred_classes = np.concatenate([gt_classes[: num_classes // 6], rng.choice(num_classes, 20, replace=False)])
    maps = _random_maps(rng, num_classes, images=6, gt_classes=gt_classes, pred_classes=pred_classes)

    total = np.zeros((num_classes, num_classes), np.int64)
    for pred, gt in maps:
        cells, counts = metrics.confusion_cells(pred, gt, num_classes)
        metrics.add_cells(total, cells, counts)

    expected = _brute_force_iou(maps, num_classes)
    iou = metrics.per_class_iou(total)
    assert set(np.flatnonzero(~np.isnan(iou)).tolist()) == set(expected)
    for c, value in expected.items():
        assert iou[c] == pytest.approx(value, abs=1e-12)
    absent = set(range(num_classes)) - set(np.unique(gt_classes)) - set(np.unique(pred_classes))
    assert absent and all(math.isnan(iou[c]) for c in absent)
    only_predicted = set(np.unique(pred_classes)) - set(np.unique(gt_classes))
    assert only_predicted and all(iou[c] == 0.0 for c in only_predicted)

    brute_miou = sum(expected.values()) / len(expected)
    assert metrics.mean_iou(total) == pytest.approx(brute_miou, abs=1e-12)
    summary = metrics.summarize(total, [f"class {i}" for i in range(num_classes)])
    assert summary["metrics"]["mIoU"] == pytest.approx(100 * brute_miou, abs=1e-3)
    assert summary["metrics"]["classes_with_iou"] == len(expected)

    valid_pixels = sum(int((gt != IGNORE_INDEX).sum()) for _, gt in maps)
    correct = sum(int(((pred == gt) & (gt != IGNORE_INDEX)).sum()) for pred, gt in maps)
    assert total.sum() == valid_pixels
    assert metrics.pixel_accuracy(total) == pytest.approx(correct / valid_pixels)


def test_hand_computed_example():
    # 3 classes; class 2 appears nowhere: excluded from the mean. 255-style ignore already mapped to -1.
    gt = np.array([[0, 0, 1, IGNORE_INDEX],
                   [0, 1, 1, IGNORE_INDEX]], np.int32)
    pred = np.array([[0, 1, 1, 2],  # a prediction under an ignore pixel does not count
                     [0, 1, 0, 1]], np.int32)
    matrix = metrics.confusion_matrix(pred, gt, 3)
    assert matrix.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 0]]
    # class 0: tp 2, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1, fn 1 -> 0.5
    iou = metrics.per_class_iou(matrix)
    assert iou[:2].tolist() == [0.5, 0.5] and math.isnan(iou[2])
    summary = metrics.summarize(matrix, ["a", "b", "c"])
    assert summary["metrics"]["mIoU"] == 50.0
    assert summary["metrics"]["pAcc"] == pytest.approx(100 * 4 / 6, abs=1e-4)
    assert summary["metrics"]["mAcc"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2, abs=1e-4)
    assert summary["per_class_iou"][2] == {"index": 2, "name": "c", "iou": None}


def test_seen_unseen_split():
    matrix = np.zeros((4, 4), np.int64)
    matrix[0, 0], matrix[0, 1] = 3, 1  # class 0: IoU 3/4
    matrix[1, 1] = 1  # class 1: tp 1, fp 1 -> 1/2
    matrix[2, 3] = 2  # class 2: IoU 0; class 3: predicted only, IoU 0
    summary = metrics.summarize(matrix, list("abcd"), seen=[0, 2])
    m = summary["metrics"]
    assert m["mIoU_seen"] == pytest.approx(100 * (0.75 + 0.0) / 2)
    assert m["mIoU_unseen"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    s, u = 0.375, 0.25
    assert m["hIoU"] == pytest.approx(100 * 2 * s * u / (s + u), abs=1e-3)
    assert (m["num_seen_classes"], m["num_unseen_classes"]) == (2, 2)


def test_sparse_cells_match_dense_bincount():
    rng = np.random.default_rng(3)
    gt = rng.integers(-1, 10, size=(31, 17)).astype(np.int32)
    pred = rng.integers(0, 10, size=(31, 17)).astype(np.int32)
    cells, counts = metrics.confusion_cells(pred, gt, 10)
    assert np.all(np.diff(cells) > 0) and counts.sum() == (gt >= 0).sum()
    valid = gt >= 0
    dense = np.bincount(gt[valid] * 10 + pred[valid], minlength=100).reshape(10, 10)
    assert np.array_equal(metrics.confusion_matrix(pred, gt, 10), dense)


def test_bad_maps_are_named():
    gt = np.zeros((2, 2), np.int32)
    with pytest.raises(ValueError, match=r"ground truth has values outside 0..2.*\[7\]"):
        metrics.confusion_cells(np.zeros((2, 2), np.int32), np.array([[0, 7], [1, 1]]), 3)
    with pytest.raises(ValueError, match=r"prediction has values outside 0..2.*\[5\]"):
        metrics.confusion_cells(np.array([[0, 5], [1, 1]]), gt, 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_cells(np.zeros((2, 3), np.int32), gt, 3)


def test_empty_matrix_gives_no_numbers():
    summary = metrics.summarize(np.zeros((3, 3), np.int64), ["a", "b", "c"])
    assert summary["metrics"]["mIoU"] is None and summary["metrics"]["pAcc"] is None
