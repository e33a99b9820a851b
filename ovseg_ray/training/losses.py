"""Training objectives for adapting CLIP to masked regions (plain PyTorch, no Ray).

Both take unit-norm region embeddings and unit-norm noun embeddings from the frozen text tower.

* :func:`contrastive_loss` (objective ``clip``): symmetric in-batch InfoNCE between regions and the
  embeddings of their nouns. Two pairs with the same noun are not negatives of each other: those
  logits are masked out in both directions, so a batch with a noun twice is scored like a batch
  where the noun appears once per region.
* :func:`vocabulary_loss` (objective ``vocab``): cross-entropy of each region over the whole training
  vocabulary, logits = cosine similarity times ``logit_scale`` (100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def duplicate_noun_mask(noun_ids: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: True where pairs ``i != j`` share a noun (excluded as negatives)."""
    same = noun_ids.unsqueeze(0) == noun_ids.unsqueeze(1)
    return same & ~torch.eye(noun_ids.numel(), dtype=torch.bool, device=noun_ids.device)


def contrastive_loss(
    regions: torch.Tensor, texts: torch.Tensor, noun_ids: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """Symmetric contrastive loss; row ``i`` of ``regions`` and ``texts`` form the positive pair.

    Args:
        regions: (N, E) unit-norm region embeddings.
        texts: (N, E) unit-norm embeddings of each region's noun.
        noun_ids: (N,) integer noun identity, used to keep duplicate nouns from being negatives.
        logit_scale: multiplier of the cosine similarities (CLIP's 1 / temperature).
    """
    if regions.shape != texts.shape or regions.dim() != 2:
        raise ValueError(f"regions {tuple(regions.shape)} and texts {tuple(texts.shape)} must both be (N, E)")
    if noun_ids.shape != regions.shape[:1]:
        raise ValueError(f"noun_ids must be ({regions.shape[0]},), got {tuple(noun_ids.shape)}")
    if regions.shape[0] == 0:
        raise ValueError("the contrastive loss needs at least one pair")
    logits = logit_scale * regions.float() @ texts.float().t()
    logits = logits.masked_fill(duplicate_noun_mask(noun_ids), float("-inf"))
    target = torch.arange(regions.shape[0], device=regions.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def vocabulary_logits(regions: torch.Tensor, vocabulary: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """(N, V) scaled cosine similarities of unit-norm regions and vocabulary embeddings."""
    return logit_scale * regions.float() @ vocabulary.float().t()


def vocabulary_loss(
    regions: torch.Tensor, vocabulary: torch.Tensor, noun_ids: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """Mean cross-entropy of each region over the vocabulary; ``noun_ids`` index ``vocabulary``."""
    if regions.shape[0] == 0:
        raise ValueError("the vocabulary loss needs at least one region")
    return F.cross_entropy(vocabulary_logits(regions, vocabulary, logit_scale), noun_ids)


def vocabulary_correct(regions: torch.Tensor, vocabulary: torch.Tensor, noun_ids: torch.Tensor) -> int:
    """How many regions have their own noun as the nearest vocabulary entry (top-1)."""
    if regions.shape[0] == 0:
        return 0
    with torch.no_grad():
        predicted = (regions.float() @ vocabulary.float().t()).argmax(dim=1)
        return int((predicted == noun_ids).sum())
