"""Reference implementations written from the official OVSeg inference's definitions (per-mask loops,
whole-map resizes), for the tests to hold the batched, banded library code against.

Written from the rules (issue 11), not copied: tight box of the binary mask; crop image and mask to it;
at source resolution pixels outside the mask become the fill colour (CLIP mean x 255); normalise;
resize the crop alone (bicubic, align_corners=False); the mask with ``nearest``. Ensemble: CLIP term
of ones for proposals without a region; weight 1 = CLIP only (only the proposals with a region).
Fusion at the processing size, then the whole (C, h, w) map resized bilinearly, then argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ovseg_ray.models.clip import CLIP_MEAN, CLIP_STD


def regions_loop(image: torch.Tensor, masks: torch.Tensor, size: int, mode: str = "bicubic"):
    """(K, 3, S, S) regions, (K, 1, S, S) masks and the (Q,) valid flags, one mask at a time."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255.0
    fill = torch.tensor([255.0 * c for c in CLIP_MEAN]).view(3, 1, 1)
    regions, crop_masks, valid = [], [], []
    for mask in masks.bool():
        ys, xs = torch.nonzero(mask, as_tuple=True)
        valid.append(len(ys) > 0)
        if not len(ys):
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        crop = image[:, y0:y1, x0:x1].float()
        crop_mask = mask[y0:y1, x0:x1]
        filled = crop * crop_mask + (~crop_mask) * fill
        normalised = (filled - mean) / std
        regions.append(F.interpolate(normalised[None], size=(size, size), mode=mode, align_corners=False)[0])
        crop_masks.append(F.interpolate(crop_mask[None, None].float(), size=(size, size), mode="nearest")[0])
    empty = torch.zeros(0, 3, size, size)
    return (torch.stack(regions) if regions else empty,
            torch.stack(crop_masks) if crop_masks else empty[:, :1], torch.tensor(valid, dtype=torch.bool))


def official_ensemble(p_mf: torch.Tensor, p_clip: torch.Tensor, valid: torch.Tensor, weight: float):
    """The official ``semantic_inference`` classes: (probabilities, which queries enter the fusion).

    ``weight`` is the official CLIP_ENSEMBLE_WEIGHT: > 0 is the geometric ensemble with a CLIP term of
    ones where a proposal has no region; 0 is CLIP only over the proposals with a region.
    """
    if weight > 0:
        clip_full = torch.ones_like(p_mf)
        clip_full[valid] = p_clip
        return p_mf ** (1 - weight) * clip_full ** weight, torch.ones(len(p_mf), dtype=torch.bool)
    return p_clip, valid


def fused_scores(probs: torch.Tensor, masks: torch.Tensor, output_size) -> torch.Tensor:
    """sum_q p[q, c] * mask[q] at the processing size, then the whole map resized bilinearly."""
    scores = torch.einsum("qc,qhw->chw", probs, masks)
    if tuple(output_size) == tuple(scores.shape[-2:]):
        return scores
    return F.interpolate(scores[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def demo_labels(p_clip: torch.Tensor, valid: torch.Tensor, mask_logits: torch.Tensor, output_size,
                threshold: float, classes: list[str]) -> torch.Tensor:
    """The official demo: per class its best query's whole row, binary masks, blank where class 0 scores 0."""
    masks = mask_logits[valid].sigmoid()
    selected = torch.zeros_like(p_clip)
    best = p_clip.argmax(dim=0)
    if len(classes) == 2 and classes[-1] == "others":
        best = best[:-1]
    for index in best.tolist():
        selected[index] = p_clip[index]
    scores = fused_scores(selected, (masks > threshold).float(), output_size)
    labels = scores.argmax(dim=0)
    labels[scores[0] == 0] = -1
    return labels


def processing_size(height: int, width: int, short: int, cap: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape, from its definition."""
    scale = short / min(height, width)
    if height < width:
        new_h, new_w = short, scale * width
    else:
        new_h, new_w = scale * height, short
    if max(new_h, new_w) > cap:
        factor = cap / max(new_h, new_w)
        new_h, new_w = new_h * factor, new_w * factor
    return int(new_h + 0.5), int(new_w + 0.5)
