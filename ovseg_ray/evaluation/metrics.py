"""Semantic segmentation metrics from a confusion matrix (plain numpy, no Ray).

Conventions (those of detectron2's ``SemSegEvaluator``, which OVSeg's numbers come from):

* The confusion matrix ``M`` is summed over the whole dataset before any ratio is taken:
  ``M[g, p]`` counts pixels whose ground truth is class ``g`` and prediction class ``p``. Pixels whose
  ground truth is the ignore label are not counted at all.
* Per-class IoU: ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` with ``TP_c = M[c, c]``, ``FP_c`` the rest of
  column ``c`` and ``FN_c`` the rest of row ``c``.
* A class absent from both the ground truth and the predictions (``TP + FP + FN = 0``) has no IoU
  (NaN, ``null`` in JSON) and is excluded from the mean. A class predicted but never in the ground
  truth has IoU 0 and counts.
* mIoU is the mean IoU over the classes that have one; pixel accuracy (pAcc) is ``trace(M) / sum(M)``;
  mean accuracy (mAcc) averages ``TP_c / (TP_c + FN_c)`` over classes present in the ground truth;
  frequency-weighted IoU (fwIoU) weights each IoU by the class's share of ground-truth pixels.
* Reported numbers (:func:`summarize`) are percentages, as in the paper's tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..data.readers import IGNORE_INDEX

CONVENTION = (
    "Confusion matrix summed over all evaluated images, ground-truth ignore pixels not counted. "
    "IoU_c = TP/(TP+FP+FN); classes absent from both ground truth and prediction (TP+FP+FN = 0) have no "
    "IoU (null) and are excluded from every mean; a class predicted but absent from the ground truth has "
    "IoU 0 and counts. pAcc = correct pixels / labelled pixels; mAcc = mean over ground-truth classes of "
    "TP/(TP+FN); fwIoU = IoU weighted by ground-truth pixel share. All values in percent."
)


def _check_maps(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Flat valid-pixel mask, after checking shapes and value ranges (errors name the bad values)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    valid = gt != ignore_index
    bad_gt = valid & ((gt < 0) | (gt >= num_classes))
    if bad_gt.any():
        values = np.unique(gt[bad_gt])[:10].tolist()
        raise ValueError(f"ground truth has values outside 0..{num_classes - 1} and ignore {ignore_index}: {values}")
    if ((pred < 0) | (pred >= num_classes)).any():
        values = np.unique(pred[(pred < 0) | (pred >= num_classes)])[:10].tolist()
        raise ValueError(f"prediction has values outside 0..{num_classes - 1}: {values}")
    return valid.ravel()


def confusion_cells(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse confusion matrix of one image: flat cell indices ``gt * N + pred`` and their pixel counts.

    An image touches few cells, so this is what travels between processes instead of an N x N
    matrix (847 classes: 717k cells).
    """
    valid = _check_maps(pred, gt, num_classes, ignore_index)
    flat = gt.ravel()[valid].astype(np.int64) * num_classes + pred.ravel()[valid].astype(np.int64)
    cells, counts = np.unique(flat, return_counts=True)
    return cells, counts.astype(np.int64)


def add_cells(matrix: np.ndarray, cells: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray) -> None:
    """Add a sparse confusion matrix (:func:`confusion_cells`) into a dense (N, N) int64 ``matrix``."""
    np.add.at(matrix.reshape(-1), np.asarray(cells, dtype=np.int64), np.asarray(counts, dtype=np.int64))


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Dense (N, N) int64 confusion matrix of one image; rows ground truth, columns prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    add_cells(matrix, *confusion_cells(pred, gt, num_classes, ignore_index))
    return matrix


def per_class_iou(matrix: np.ndarray) -> np.ndarray:
    """(N,) IoU per class in [0, 1]; NaN where the class is in neither ground truth nor prediction."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    iou = np.full(matrix.shape[0], np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """(N,) recall per class; NaN where the class has no ground-truth pixel."""
    tp = np.diag(matrix).astype(np.float64)
    gt_pixels = matrix.sum(axis=1)
    acc = np.full(matrix.shape[0], np.nan)
    np.divide(tp, gt_pixels, out=acc, where=gt_pixels > 0)
    return acc


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def mean_iou(matrix: np.ndarray, classes: Iterable[int] | None = None) -> float:
    """Mean IoU over ``classes`` (default all) that have an IoU; NaN if none has."""
    iou = per_class_iou(matrix)
    if classes is not None:
        iou = iou[np.asarray(list(classes), dtype=np.int64)]
    return _nanmean(iou)


def pixel_accuracy(matrix: np.ndarray) -> float:
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


def frequency_weighted_iou(matrix: np.ndarray) -> float:
    iou = per_class_iou(matrix)
    gt_pixels = matrix.sum(axis=1).astype(np.float64)
    keep = ~np.isnan(iou) & (gt_pixels > 0)
    total = gt_pixels[keep].sum()
    return float((iou[keep] * gt_pixels[keep]).sum() / total) if total else float("nan")


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else round(100.0 * value, 4)


def summarize(matrix: np.ndarray, class_names: Sequence[str], seen: Iterable[int] | None = None) -> dict:
    """The reported numbers (percent; ``None`` where undefined) for a dataset-level confusion matrix.

    With ``seen`` (indices of classes seen in training) it adds ``mIoU_seen``, ``mIoU_unseen`` and their
    harmonic mean ``hIoU``, each following the exclusion rule above.
    """
    if matrix.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(class_names)} class names")
    iou = per_class_iou(matrix)
    metrics = {
        "mIoU": _percent(_nanmean(iou)),
        "pAcc": _percent(pixel_accuracy(matrix)),
        "mAcc": _percent(_nanmean(per_class_accuracy(matrix))),
        "fwIoU": _percent(frequency_weighted_iou(matrix)),
        "classes_with_iou": int((~np.isnan(iou)).sum()),
    }
    if seen is not None:
        seen_set = sorted(set(int(i) for i in seen))
        unseen = [i for i in range(len(class_names)) if i not in set(seen_set)]
        seen_miou, unseen_miou = mean_iou(matrix, seen_set), mean_iou(matrix, unseen)
        harmonic = (2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
                    if seen_miou + unseen_miou > 0 else float("nan"))
        metrics.update({
            "mIoU_seen": _percent(seen_miou),
            "mIoU_unseen": _percent(unseen_miou),
            "hIoU": _percent(harmonic),
            "num_seen_classes": len(seen_set),
            "num_unseen_classes": len(unseen),
        })
    return {
        "metrics": metrics,
        "per_class_iou": [
            {"index": index, "name": name, "iou": _percent(value)}
            for index, (name, value) in enumerate(zip(class_names, iou))
        ],
    }
