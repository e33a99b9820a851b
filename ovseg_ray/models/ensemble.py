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


def semantic_labels(probs: torch.Tensor, mask_logits: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """Argmax of :func:`semantic_scores`, computed in row chunks so C x H x W never exists at once."""
    height = mask_logits.shape[-2]
    labels = torch.empty(mask_logits.shape[-2:], dtype=torch.long, device=mask_logits.device)
    for start in range(0, height, rows_per_chunk):
        stop = min(start + rows_per_chunk, height)
        labels[start:stop] = semantic_scores(probs, mask_logits[:, start:stop]).argmax(dim=0)
    return labels
