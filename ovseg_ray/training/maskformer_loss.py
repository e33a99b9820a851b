"""MaskFormer's set-prediction loss for semantic segmentation (paper section 3.1; MaskFormer's criterion).

Per image the targets are one binary mask per class present in the (cropped) label map. Queries are
matched to targets by the Hungarian algorithm on ``class_weight * (-p(class)) + mask_weight * focal +
dice_weight * dice``; the loss is cross-entropy over the classes plus "no object" (weight
``no_object_weight`` for that class) on every query, sigmoid focal (alpha 0.25, gamma 2) and dice on the
matched masks, for the last decoder layer and every auxiliary one (deep supervision).

Ignore pixels (label 255 in COCO-Stuff, and the padding) contribute nothing: every per-pixel term,
in the matching costs and in the loss, runs over the image's labelled pixels only. (MaskFormer's own
code treats them as background of every mask; we deliberately leave them out.)

Normalisation is global across data-parallel workers (``dist`` all-reduces): masks are divided by the
mean number of target masks per worker, cross-entropy by the mean sum of class weights, so that N
workers' averaged gradients equal one process's on the union of their batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


@dataclass(frozen=True)
class LossWeights:
    """MaskFormer's weights (the paper's: class 1, mask 20, dice 1, no-object 0.1)."""

    class_weight: float = 1.0
    mask_weight: float = 20.0
    dice_weight: float = 1.0
    no_object_weight: float = 0.1


@dataclass
class Targets:
    """One image's targets: class ids (K,), binary masks (K, H, W) and the labelled pixels (H, W)."""

    classes: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor


def semantic_targets(labels: torch.Tensor, ignore_index: int = 255) -> list[Targets]:
    """Per-class binary masks of a (B, H, W) label batch: the classes present, ignore pixels excluded."""
    out = []
    for label in labels:
        valid = label != ignore_index
        classes = torch.unique(label[valid])
        masks = label.unsqueeze(0) == classes.view(-1, 1, 1)
        out.append(Targets(classes.long(), masks.float(), valid.float()))
    return out


def _focal_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel focal loss of each logit if its target were 1 (pos) or 0 (neg), alpha applied."""
    prob = logits.sigmoid()
    pos = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        logits, torch.ones_like(logits), reduction="none")
    neg = (1 - FOCAL_ALPHA) * prob ** FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        logits, torch.zeros_like(logits), reduction="none")
    return pos, neg


def pairwise_costs(class_logits: torch.Tensor, mask_logits: torch.Tensor, target: Targets,
                   weights: LossWeights) -> torch.Tensor:
    """(Q, K) matching cost of one image: queries (logits (Q, C+1), masks (Q, h, w)) against targets.

    Target masks and the labelled-pixel map are resized (nearest) to the prediction's resolution.
    """
    size = mask_logits.shape[-2:]
    masks = F.interpolate(target.masks[:, None], size=size, mode="nearest")[:, 0].flatten(1)  # (K, hw)
    valid = F.interpolate(target.valid[None, None], size=size, mode="nearest").flatten()  # (hw,)
    logits = mask_logits.flatten(1).float()  # (Q, hw)
    pixels = valid.sum().clamp(min=1)
    pos, neg = _focal_terms(logits)
    focal = ((pos * valid) @ masks.T + (neg * valid) @ ((1 - masks) * valid).T) / pixels
    prob = logits.sigmoid() * valid
    dice = 1 - (2 * prob @ masks.T + 1) / (prob.sum(-1, keepdim=True) + masks.sum(-1)[None] + 1)
    classes = -class_logits.float().softmax(-1)[:, target.classes]
    return weights.mask_weight * focal + weights.class_weight * classes + weights.dice_weight * dice


def match(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[Targets],
          weights: LossWeights) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hungarian matching per image: (query indices, target indices), each of length min(Q, K)."""
    out = []
    with torch.no_grad():
        for b, target in enumerate(targets):
            if len(target.classes) == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            cost = pairwise_costs(class_logits[b], mask_logits[b], target, weights)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((rows.astype(np.int64), cols.astype(np.int64)))
    return out


def _global_mean(value: float, device: torch.device) -> float:
    """``value`` averaged over the data-parallel workers (itself without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor) / dist.get_world_size()
    return value


def layer_losses(class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[Targets],
                 weights: LossWeights, num_masks: float) -> dict[str, torch.Tensor]:
    """Unweighted ``ce``, ``mask`` (focal) and ``dice`` of one decoder layer's (B, Q, ...) outputs."""
    indices = match(class_logits, mask_logits, targets, weights)
    batch, queries, num_logits = class_logits.shape
    no_object = num_logits - 1
    target_classes = torch.full((batch, queries), no_object, dtype=torch.long, device=class_logits.device)
    for b, (rows, cols) in enumerate(indices):
        target_classes[b, rows] = targets[b].classes[cols].to(class_logits.device)
    class_weights = torch.ones(num_logits, device=class_logits.device)
    class_weights[no_object] = weights.no_object_weight
    per_query = F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, reduction="none")
    query_weights = class_weights[target_classes]
    ce = (per_query * query_weights).sum() / _global_mean(float(query_weights.sum()), class_logits.device)

    predicted = [mask_logits[b, rows] for b, (rows, _) in enumerate(indices)]
    matched = torch.cat(predicted) if predicted else mask_logits[:0, 0]
    focal = dice = mask_logits.sum() * 0.0  # keeps the graph connected when nothing is matched
    if matched.shape[0]:
        goal = torch.cat([targets[b].masks[cols] for b, (_, cols) in enumerate(indices)]).to(matched.device)
        valid = torch.cat([targets[b].valid.expand(len(cols), -1, -1) for b, (_, cols) in enumerate(indices)])
        valid = valid.to(matched.device)
        logits = F.interpolate(matched[:, None].float(), size=goal.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0].flatten(1)
        goal, valid = goal.flatten(1), valid.flatten(1)
        pixels = valid.sum(1).clamp(min=1)
        ce_pixels = F.binary_cross_entropy_with_logits(logits, goal, reduction="none")
        prob = logits.sigmoid()
        p_t = prob * goal + (1 - prob) * (1 - goal)
        alpha_t = FOCAL_ALPHA * goal + (1 - FOCAL_ALPHA) * (1 - goal)
        focal = ((alpha_t * ce_pixels * (1 - p_t) ** FOCAL_GAMMA * valid).sum(1) / pixels).sum() / num_masks
        prob = prob * valid
        dice = (1 - (2 * (prob * goal).sum(1) + 1) / (prob.sum(1) + goal.sum(1) + 1)).sum() / num_masks
    return {"ce": ce, "mask": focal, "dice": dice}


def maskformer_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
                    weights: LossWeights = LossWeights(), ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """The total loss and its terms for every decoder layer's outputs.

    ``class_logits`` (L, B, Q, C + 1) with "no object" last, ``mask_logits`` (L, B, Q, h, w), ``labels``
    (B, H, W). Returns ``loss`` (weighted sum over layers and terms) and, for reporting, the last
    layer's ``ce``, ``mask`` and ``dice`` (unweighted).
    """
    targets = semantic_targets(labels, ignore_index)
    num_masks = max(_global_mean(float(sum(len(t.classes) for t in targets)), labels.device), 1.0)
    total = class_logits.new_zeros(())
    last = {}
    for layer in range(class_logits.shape[0]):
        terms = layer_losses(class_logits[layer], mask_logits[layer], targets, weights, num_masks)
        total = total + (weights.class_weight * terms["ce"] + weights.mask_weight * terms["mask"]
                         + weights.dice_weight * terms["dice"])
        last = terms
    return {"loss": total, **{k: v.detach() for k, v in last.items()}}
