"""The per-image math of pair mining, in plain PyTorch (no Ray): proposals -> masks, nouns -> masks.

Stage 1 (:class:`ProposalMasks`) runs the MaskFormer through :meth:`Segmenter.propose` and turns
its mask logits into binary masks **at the original image size**: the logits are resized
bilinearly to the image size, then thresholded (``sigmoid > threshold``), as inference does when it
maps proposals to the output size. Resizing logits rather than nearest-resizing binary masks keeps
mask edges smooth and sub-pixel accurate. Masks with fewer than ``min_pixels`` pixels are dropped.

Stage 2 (:class:`NounMatcher`) embeds every kept mask on the original image with
:meth:`Segmenter.embed_regions` (the shared region preprocessing + masked CLIP), embeds every noun
with :class:`TextEmbedder` (template ensemble), and gives each noun the mask with the highest cosine
similarity. The embedded region is exactly the mask that is written out, on the same image that
training later reads.

Batching moves results by float noise only. Images of one padded size share a MaskFormer forward
(``OpenVocabMaskFormer.propose_many``), whose outputs then differ from the image's own run by about
1e-7 in the class embeddings (so in objectness) and 1e-5 in the mask logits, which could flip a pixel
lying exactly at the threshold. Everything else is per image: the region encoder runs once per image,
and every noun, for matching and objectness alike, is embedded alone (``TextEmbedder(..., alone=True)``),
so a cached text embedding is the same whichever image put it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..inference import Segmenter, image_to_tensor


@dataclass
class ImageProposals:
    indices: list[int]  # query index of each kept proposal
    masks: torch.Tensor  # (K, H, W) bool on the CPU, at the original image size
    objectness: list[float] = field(default_factory=list)  # per kept proposal, given the image's nouns


@dataclass(frozen=True)
class NounMatch:
    noun_index: int  # position in the noun list
    proposal: int  # position in the proposal list (not the query index)
    score: float  # cosine similarity of noun and region
    margin: float | None = None  # score minus the noun's second-best region's (None with one region)


def masks_at_size(
    mask_logits: torch.Tensor, size: tuple[int, int], threshold: float, min_pixels: int = 1, chunk: int = 16
) -> tuple[list[int], torch.Tensor]:
    """Resize (Q, h, w) logits bilinearly to ``size``, binarise at ``threshold``, drop small masks.

    Returns the indices of the kept masks and the (K, H, W) bool masks (CPU). Work is done ``chunk``
    masks at a time so a large image never holds all Q float masks at once.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold must be within (0, 1), got {threshold}")
    height, width = int(size[0]), int(size[1])
    kept_indices: list[int] = []
    kept: list[torch.Tensor] = []
    for start in range(0, mask_logits.shape[0], chunk):
        logits = mask_logits[start:start + chunk].float()
        if tuple(logits.shape[-2:]) != (height, width):
            logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        binary = logits.sigmoid() > threshold
        areas = binary.flatten(1).sum(dim=1)
        keep = (areas >= max(1, min_pixels)).nonzero().flatten()
        if keep.numel():
            kept_indices.extend(int(i) + start for i in keep.tolist())
            kept.append(binary[keep].cpu())
    masks = torch.cat(kept) if kept else torch.zeros(0, height, width, dtype=torch.bool)
    return kept_indices, masks


def match_nouns(noun_embeddings: torch.Tensor, region_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each unit-norm noun (N, E), the best unit-norm region (K, E): (indices (N,), cosine (N,)).

    Ties go to the lowest region index.
    """
    if region_embeddings.shape[0] == 0:
        raise ValueError("no regions to match nouns to")
    similarity = noun_embeddings.float() @ region_embeddings.float().T  # (N, K)
    best = similarity.argmax(dim=1)
    return best, similarity.gather(1, best[:, None])[:, 0]


class ProposalMasks:
    """Stage 1 for one image: MaskFormer proposals as binary masks at the image's own size."""

    def __init__(self, segmenter: Segmenter, threshold: float | None = None, min_pixels: int = 1):
        self.segmenter = segmenter
        self.threshold = segmenter.config.mask_threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"mask threshold must be within (0, 1), got {self.threshold}")
        self.min_pixels = int(min_pixels)

    def __call__(self, image: np.ndarray, nouns: list[str] | None = None) -> ImageProposals:
        """The kept proposals; with ``nouns``, also each one's MaskFormer objectness: 1 - its "no
        object" probability when the image's nouns are the vocabulary (the official classifier)."""
        return self.many([image], [nouns])[0]

    @torch.no_grad()
    def many(self, images: list[np.ndarray], nouns: list[list[str] | None]) -> list[ImageProposals]:
        """:meth:`__call__` of several images, their MaskFormer forwards batched per padded size."""
        out = []
        for image, words, proposals in zip(images, nouns, self.segmenter.propose_each(images)):
            indices, masks = masks_at_size(proposals.mask_logits, image.shape[:2], self.threshold, self.min_pixels)
            objectness = []
            if words and indices:
                kept = proposals.class_embeddings[torch.tensor(indices, device=proposals.class_embeddings.device)]
                objectness = self.segmenter.maskformer_probs(kept, words, alone=True).sum(dim=-1).float().cpu().tolist()
            out.append(ImageProposals(indices, masks, objectness))
        return out


class NounMatcher:
    """Stage 2 for one image: each noun to its most similar proposal region (masked CLIP)."""

    def __init__(self, segmenter: Segmenter, min_score: float | None = None):
        self.segmenter = segmenter
        self.min_score = min_score

    def noun_embeddings(self, nouns: list[str]) -> torch.Tensor:
        return self.segmenter.text(nouns, alone=True)  # never depends on the other nouns (module docstring)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, masks: torch.Tensor, nouns: list[str]) -> list[NounMatch]:
        """Matches for ``nouns`` (kept in noun order), those under ``min_score`` left out."""
        if not nouns:
            return []
        if masks.shape[0] == 0:
            raise ValueError("no proposal masks to match nouns to")
        image_t = image_to_tensor(image)
        regions, valid = self.segmenter.embed_regions(image_t, masks)
        region_index = valid.nonzero().flatten().tolist()  # region k -> proposal position
        noun_embeddings = self.noun_embeddings(nouns)
        best, scores = match_nouns(noun_embeddings, regions)
        margins = [None] * len(nouns)
        if regions.shape[0] >= 2:
            top2 = (noun_embeddings.float() @ regions.float().T).topk(2, dim=1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
        matches = []
        for noun_index, (k, score) in enumerate(zip(best.tolist(), scores.tolist())):
            if self.min_score is not None and score < self.min_score:
                continue
            margin = None if margins[noun_index] is None else float(margins[noun_index])
            matches.append(NounMatch(noun_index, region_index[k], float(score), margin))
        return matches
