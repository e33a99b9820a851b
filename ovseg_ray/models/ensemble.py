"""Two-stage classification and fusion (OVSeg section 3.1), as the official evaluation computes them.

Ensemble: ``p = p_maskformer ** (1 - lambda) * p_clip ** lambda`` per query. A proposal whose binary
mask is empty has no CLIP region; its CLIP term is 1 (the official code starts from a tensor of ones),
so it keeps ``p_maskformer ** (1 - lambda)`` and its sigmoid mask still enters the fusion. lambda = 0
is MaskFormer only; lambda = 1 is the official "CLIP only" result: only the proposals with a region,
each with its CLIP probabilities.

Fusion: ``score[c, h, w] = sum_q p[q, c] * mask[q, h, w]`` at the processing size (the resized image
the MaskFormer saw), then the (C, h, w) score map is resized bilinearly to the output size
(detectron2's ``sem_seg_postprocess``) and the argmax taken. Both happen a band of output rows at a
time, each band computed from the processing-size rows it needs, so 847 classes on a 12-megapixel
photo never hold a full-resolution (C, H, W) map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Label of pixels no selected proposal covers (the official demo inference leaves them unlabelled).
UNLABELLED = -1


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometric ensemble: the (P, C) probabilities and the (P,) query indices they belong to.

    ``p_clip`` has one row per ``valid`` query. Every query is kept except at lambda = 1, where only
    the valid ones are (the official CLIP-only inference drops the others from the fusion).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be within [0, 1], got {lam}")
    valid = valid.to(p_maskformer.device)
    if int(valid.sum()) != p_clip.shape[0]:
        raise ValueError(f"{int(valid.sum())} valid proposals but {p_clip.shape[0]} CLIP rows")
    every = torch.arange(p_maskformer.shape[0], device=p_maskformer.device)
    if lam == 0.0:
        return p_maskformer, every
    if lam == 1.0:
        return p_clip.to(p_maskformer.dtype), every[valid]
    clip_full = torch.ones_like(p_maskformer)
    clip_full[valid] = p_clip.to(p_maskformer.dtype)
    return p_maskformer.pow(1.0 - lam) * clip_full.pow(lam), every


def kept_proposals(masks: torch.Tensor, p_maskformer: torch.Tensor, min_area: int = 0,
                   no_object_above: float | None = None) -> torch.Tensor | None:
    """(Q,) which proposals go to the CLIP stage under the skip options (None: all, options off).

    A skipped proposal is treated as an empty mask: no region, no CLIP probability, so it adds
    nothing to the fusion (lambda > 0). ``masks`` (Q, h, w) bool; ``p_maskformer`` (Q, C), whose
    missing mass is the query's no-object probability.
    """
    if min_area <= 0 and no_object_above is None:
        return None
    keep = torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
    if min_area > 0:
        keep &= masks.flatten(1).sum(dim=1) >= min_area
    if no_object_above is not None:
        keep &= (1.0 - p_maskformer.sum(dim=1)).to(masks.device) <= no_object_above
    return keep


def demo_selection(probs: torch.Tensor, skip_last_class: bool = False) -> torch.Tensor:
    """The official demo's query selection: each class's highest-probability query keeps its whole
    probability row, every other row becomes zero. ``skip_last_class``: the class appended as
    "others" to a one-name vocabulary picks no query of its own."""
    best = probs.argmax(dim=0)
    if skip_last_class:
        best = best[:-1]
    selected = torch.zeros_like(probs)
    selected[best] = probs[best]
    return selected


def semantic_scores(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(C, h, w) = sum over queries of class probability times mask (sigmoid or binary)."""
    return torch.einsum("qc,qhw->chw", probs, masks)


def linear_taps(in_size: int, out_size: int, device: torch.device):
    """Source indices (lo, hi) and weights (w_lo, w_hi) of a bilinear, align_corners=False resize.

    Float32 arithmetic as in PyTorch's CPU kernel: scale = in / out, source = scale * (dst + 0.5) - 0.5
    rounded once (the kernel's fused multiply-add), clamped at 0.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    dst = torch.arange(out_size, device=device, dtype=torch.float64)
    src = (scale.double().item() * (dst + 0.5) - 0.5).float().clamp(min=0)
    lo = src.long()
    w_hi = (src - lo.float()).clamp(0, 1)
    hi = torch.where(lo < in_size - 1, lo + 1, lo)
    return lo, hi, 1.0 - w_hi, w_hi


def _mask_rows(mask_logits: torch.Tensor, start: int, stop: int, binary_threshold: float | None) -> torch.Tensor:
    rows = mask_logits[:, start:stop].float().sigmoid()
    return rows if binary_threshold is None else (rows > binary_threshold).float()


class _ResizedRows:
    """Processing-size score rows resized along x to the output width, each computed once and kept
    while later output rows still need it (output rows advance, so the needed rows only move down)."""

    def __init__(self, probs, mask_logits, out_w: int, binary_threshold: float | None):
        self.probs, self.mask_logits, self.out_w, self.binary_threshold = probs, mask_logits, out_w, binary_threshold
        self.rows: dict[int, torch.Tensor] = {}  # input row -> (C, out_w)

    def get(self, first: int, last: int) -> dict[int, torch.Tensor]:
        """Input rows first..last, resized along x; rows above ``first`` are dropped."""
        for row in [r for r in self.rows if r < first]:
            del self.rows[row]
        start = max(self.rows, default=first - 1) + 1
        if start <= last:
            scores = semantic_scores(self.probs, _mask_rows(self.mask_logits, start, last + 1, self.binary_threshold))
            # F.interpolate with the row count unchanged is the exact identity on rows: PyTorch's own
            # kernel computes the x taps, as it does for the whole map.
            resized = F.interpolate(scores[None], size=(scores.shape[1], self.out_w), mode="bilinear",
                                    align_corners=False)[0]
            self.rows.update({start + i: resized[:, i] for i in range(resized.shape[1])})
        return self.rows


def fused_labels(
    probs: torch.Tensor,
    mask_logits: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    binary_threshold: float | None = None,
    blank_unlabelled: bool = False,
    max_chunk_elements: int = 24_000_000,
) -> torch.Tensor:
    """Per-pixel argmax of the fused score map, resized bilinearly to ``output_size``.

    ``probs`` (P, C) belong to the P rows of ``mask_logits`` (P, h, w) at the processing size. Masks
    enter as ``sigmoid(logits)``, or binarised at ``binary_threshold`` (the demo inference). The result
    equals ``argmax(interpolate(semantic_scores(...)))`` up to float rounding; ``blank_unlabelled``
    marks pixels where the first class scores exactly 0 (no selected mask covers them: the official
    demo) as :data:`UNLABELLED`. About ``max_chunk_elements`` floats are alive at a time.
    """
    queries, height, width = mask_logits.shape
    classes = probs.shape[1]
    out_h, out_w = output_size or (height, width)
    device = mask_logits.device
    labels = torch.empty((out_h, out_w), dtype=torch.long, device=device)
    probs = probs.float()
    if queries == 0:
        labels.fill_(UNLABELLED if blank_unlabelled else 0)
        return labels
    if (out_h, out_w) == (height, width):
        rows_per_chunk = max(1, max_chunk_elements // ((queries + classes) * width))
        for start in range(0, height, rows_per_chunk):
            stop = min(start + rows_per_chunk, height)
            scores = semantic_scores(probs, _mask_rows(mask_logits, start, stop, binary_threshold))
            labels[start:stop] = _argmax(scores, blank_unlabelled)
        return labels
    row_lo, row_hi, row_w0, row_w1 = linear_taps(height, out_h, device)
    lo, hi, w0, w1 = row_lo.tolist(), row_hi.tolist(), row_w0.tolist(), row_w1.tolist()
    # Alive at a time: the resized input rows a band needs (about b * height / out_h + 2 for b output
    # rows) and the band, each row C x out_w floats.
    per_band_row = classes * out_w * (1 + height / out_h)
    rows_per_chunk = max(1, int((max_chunk_elements - 2 * classes * out_w) // per_band_row))
    resized = _ResizedRows(probs, mask_logits, out_w, binary_threshold)
    band = torch.empty((classes, rows_per_chunk, out_w), device=device)
    for start in range(0, out_h, rows_per_chunk):
        stop = min(start + rows_per_chunk, out_h)
        rows = resized.get(lo[start], hi[stop - 1])
        for out_row in range(start, stop):  # y taps: one weighted sum of two resized rows per output row
            target = band[:, out_row - start]
            torch.mul(rows[lo[out_row]], w0[out_row], out=target)
            target.add_(rows[hi[out_row]], alpha=w1[out_row])
        labels[start:stop] = _argmax(band[:, : stop - start], blank_unlabelled)
    return labels


def _argmax(scores: torch.Tensor, blank_unlabelled: bool) -> torch.Tensor:
    labels = scores.max(dim=0).indices  # first maximum, as argmax (and several times faster over dim 0)
    if blank_unlabelled:
        labels[scores[0] == 0] = UNLABELLED
    return labels
