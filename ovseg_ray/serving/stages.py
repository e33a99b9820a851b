"""The two serving stages in plain PyTorch (no Ray): what each deployment computes and sends.

:class:`ProposalStage` runs the MaskFormer (:meth:`Segmenter.propose`), embeds the class names
(the :class:`TextEmbedder` cache lives here) and, once the regions come back, ensembles and fuses.
:class:`RegionStage` runs masked CLIP on the regions of many requests in one encoder call.

Only small things cross between them: the resized image (float32 at the processing size) and the
binarised masks packed 8 per byte go to the region stage; unit-norm region embeddings (K, E) come
back. The mask logits stay in the proposal stage, which fuses at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..device import resolve_device
from ..inference import Proposals, Segmenter
from ..models.ovseg import build_model
from ..outputs import compact_labels
from .config import ModelSettings

Stage = Literal["proposals", "regions", "all"]


def load_segmenter(settings: ModelSettings, stage: Stage = "all", device: torch.device | None = None) -> Segmenter:
    """A Segmenter on ``device`` (default: ``settings.device`` on this machine) holding only what
    ``stage`` runs (weights identical in every replica).

    ``proposals`` drops the CLIP vision tower; ``regions`` drops the MaskFormer and the text tower.
    """
    model = build_model(settings.preset, weights=settings.weights, device="cpu", seed=settings.seed)
    segmenter = Segmenter(model, text_cache_size=settings.text_cache_size, **settings.segmenter_options())
    if stage == "proposals":
        model.region_encoder.visual = None
        model.clip.visual = None
    elif stage == "regions":
        model.maskformer = None
        for name in ("transformer", "token_embedding", "ln_final", "positional_embedding", "text_projection"):
            if getattr(model.clip, name, None) is not None:
                setattr(model.clip, name, None)
    model.to(device or resolve_device(settings.device))
    return segmenter


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of ``array``; arrays from Ray's object store are read-only, so those are copied."""
    return torch.from_numpy(np.require(array, requirements="W"))


@dataclass
class RegionRequest:
    """One image's proposals for the region stage."""

    image: np.ndarray  # (3, h, w) float32 in [0, 255]: the resized image the masks refer to
    packed_masks: np.ndarray  # np.packbits of the (Q, h, w) binary masks
    num_masks: int

    @classmethod
    def from_tensors(cls, image: torch.Tensor, masks: torch.Tensor) -> RegionRequest:
        packed = np.packbits(masks.detach().to("cpu", torch.bool).numpy().ravel())
        return cls(image.detach().to("cpu", torch.float32).numpy(), packed, int(masks.shape[0]))

    def masks(self) -> torch.Tensor:
        height, width = self.image.shape[-2:]
        count = self.num_masks * height * width
        bits = np.unpackbits(self.packed_masks, count=count).reshape(self.num_masks, height, width)
        return torch.from_numpy(bits.astype(bool))


@dataclass
class RegionResult:
    embeddings: np.ndarray  # (K, E) float32, unit norm, one row per valid mask
    valid: np.ndarray  # (Q,) bool: masks that produced a region
    batch_requests: int  # requests whose regions went through the encoder together
    batch_regions: int
    forward_s: float


class RegionStage:
    """Masked-CLIP embeddings for the regions of several requests, in one encoder forward."""

    def __init__(self, segmenter: Segmenter, max_regions_per_forward: int = 512):
        self.segmenter = segmenter
        self.max_regions_per_forward = max_regions_per_forward

    @torch.no_grad()
    def embed_batch(self, requests: list[RegionRequest]) -> list[RegionResult]:
        start = self.segmenter.clock()
        items = [(_tensor(r.image), r.masks()) for r in requests]
        results = self.segmenter.embed_regions_many(items, self.max_regions_per_forward)
        elapsed = self.segmenter.clock() - start
        total = sum(int(embeddings.shape[0]) for embeddings, _ in results)
        return [
            RegionResult(embeddings.cpu().numpy(), valid.cpu().numpy(), len(requests), total, elapsed)
            for embeddings, valid in results
        ]


@dataclass
class PendingSegmentation:
    """A request between the two stages: proposals and MaskFormer probabilities, still on device."""

    proposals: Proposals
    p_maskformer: torch.Tensor  # (Q, C)
    classes: list[str]
    lam: float
    threshold: float
    mode: str
    output_size: tuple[int, int]
    region_request: RegionRequest | None  # None when lambda == 0 (the CLIP stage is skipped)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SegmentOutput:
    """What the proposal stage returns: the label map and how it was made."""

    labels: np.ndarray  # (H, W), compact unsigned type, index into the request's classes
    num_proposals: int
    num_valid_regions: int
    timings: dict[str, float]
    region_batch_requests: int = 0
    region_batch_regions: int = 0


class ProposalStage:
    """MaskFormer proposals, class-name embeddings, ensemble and fusion."""

    def __init__(self, segmenter: Segmenter):
        self.segmenter = segmenter

    @torch.no_grad()
    def propose(self, image: np.ndarray, classes: list[str], lam: float, threshold: float,
                mode: str = "eval") -> PendingSegmentation:
        segmenter = self.segmenter
        timings = {}
        start = segmenter.clock()
        proposals = segmenter.propose(np.require(image, requirements="W"))
        now = segmenter.clock()
        timings["proposals_s"], start = now - start, now
        segmenter.text(classes)  # embeds names not seen before; cached for every later request
        timings["text_s"] = segmenter.clock() - start
        p_maskformer = segmenter.maskformer_probs(proposals.class_embeddings, classes)
        region_request = None
        if lam > 0.0:
            region_request = RegionRequest.from_tensors(proposals.image,
                                                        segmenter.region_masks(proposals, p_maskformer, threshold))
        return PendingSegmentation(proposals, p_maskformer, classes, lam, threshold, mode,
                                   (int(image.shape[0]), int(image.shape[1])), region_request, timings)

    @torch.no_grad()
    def finish(self, pending: PendingSegmentation, regions: RegionResult | None) -> SegmentOutput:
        segmenter = self.segmenter
        p_mf = pending.p_maskformer
        start = segmenter.clock()
        p_clip = valid = None  # no regions: lambda 0, MaskFormer only
        if regions is not None:
            p_clip = segmenter.clip_probs(_tensor(regions.embeddings).to(segmenter.device), pending.classes)
            valid = _tensor(regions.valid)
        logits = pending.proposals.mask_logits
        if pending.mode == "demo":
            labels = segmenter.fuse_demo(p_clip, valid, logits, pending.output_size, pending.threshold, pending.classes)
        else:
            labels = segmenter.fuse(p_mf, p_clip, valid, logits, pending.output_size, pending.lam)
        timings = {**pending.timings, "fusion_s": segmenter.clock() - start}
        return SegmentOutput(
            labels=compact_labels(labels, len(pending.classes)),
            num_proposals=int(p_mf.shape[0]),
            num_valid_regions=0 if valid is None else int(valid.sum()),
            timings=timings,
            region_batch_requests=regions.batch_requests if regions else 0,
            region_batch_regions=regions.batch_regions if regions else 0,
        )
