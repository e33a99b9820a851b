"""Two-stage classification and fusion (OVSeg, section 3.1).

``p = p_maskformer ** (1 - lambda) * p_clip ** lambda``: lambda = 0 is MaskFormer only, lambda = 1 is
CLIP only. Proposals whose binarised mask is empty have no CLIP region; they keep the MaskFormer
probability (their CLIP term is taken to be p_maskformer). Fusion sums class probabilities times
sigmoid masks over queries and takes the argmax per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(embeddings: torch.Tensor, text: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """``temperature * cos(embeddings, text)`` for (N, E) and (C, E) inputs: (N, C)."""
    return temperature * F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T


def maskformer_probs(
    class_embeddings: torch.Tensor,
    text: torch.Tensor,
    no_object: torch.Tensor,
    temperature: float = 100.0,
) -> torch.Tensor:
    """(Q, C) class probabilities of the MaskFormer queries.

    Softmax over the C classes plus the learnable "no object" embedding; the no-object column is
    then dropped (a query that is mostly "no object" has small probabilities everywhere).
    """
    classifier = torch.cat([F.normalize(text, dim=-1), F.normalize(no_object.view(1, -1), dim=-1)])
    return cosine_logits(class_embeddings, classifier, temperature).softmax(dim=-1)[:, :-1]


def clip_probs(region_embeddings: torch.Tensor, text: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """(K, C) class probabilities of the CLIP regions: softmax over the C classes."""
    return cosine_logits(region_embeddings, text, temperature).softmax(dim=-1)


def ensemble_probs(
    p_maskformer: torch.Tensor, p_clip: torch.Tensor, valid: torch.Tensor, lam: float
) -> torch.Tensor:
    """Geometric ensemble per query; ``p_clip`` has one row per ``valid`` query."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be within [0, 1], got {lam}")
    if int(valid.sum()) != p_clip.shape[0]:
        raise ValueError(f"{int(valid.sum())} valid proposals but {p_clip.shape[0]} CLIP rows")
    clip_full = p_maskformer.clone()
    clip_full[valid] = p_clip.to(p_maskformer.dtype)
    if lam == 0.0:
        return p_maskformer
    if lam == 1.0:
        return clip_full
    return p_maskformer.pow(1.0 - lam) * clip_full.pow(lam)


def semantic_scores(probs: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(C, H, W) = sum over queries of class probability times sigmoid mask."""
    return torch.einsum("qc,qhw->chw", probs, mask_logits.sigmoid())


def _linear_taps(in_size: int, out_size: int, device: torch.device):
    """Source rows (lo, hi) and weight of hi for a bilinear, align_corners=False resize (as F.interpolate)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, (src - lo).float()


def semantic_labels(
    probs: torch.Tensor,
    mask_logits: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    max_chunk_elements: int = 32_000_000,
) -> torch.Tensor:
    """Per-pixel argmax of :func:`semantic_scores`, optionally at a larger ``output_size``.

    The mask logits are resized bilinearly (exactly as ``F.interpolate`` with align_corners=False)
    a band of output rows at a time, so neither Q x H x W logits nor C x H x W scores ever exist at
    once: a 12-megapixel photo with 847 classes stays within a few hundred MB.
    """
    queries, height, width = mask_logits.shape
    out_h, out_w = output_size or (height, width)
    rows_per_chunk = max(1, max_chunk_elements // ((queries + probs.shape[1]) * out_w))
    labels = torch.empty((out_h, out_w), dtype=torch.long, device=mask_logits.device)
    same_size = (out_h, out_w) == (height, width)
    if not same_size:
        row_lo, row_hi, row_w = _linear_taps(height, out_h, mask_logits.device)
        col_lo, col_hi, col_w = _linear_taps(width, out_w, mask_logits.device)
    for start in range(0, out_h, rows_per_chunk):
        stop = min(start + rows_per_chunk, out_h)
        if same_size:
            band = mask_logits[:, start:stop]
        else:
            w = row_w[start:stop].view(1, -1, 1)
            rows = mask_logits[:, row_lo[start:stop]] * (1 - w) + mask_logits[:, row_hi[start:stop]] * w
            band = rows[:, :, col_lo] * (1 - col_w) + rows[:, :, col_hi] * col_w
        labels[start:stop] = semantic_scores(probs, band).argmax(dim=0)
    return labels
