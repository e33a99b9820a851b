"""Two-stage OVSeg inference in plain PyTorch (no Ray): proposals, masked-CLIP regions, ensemble, fusion.

The stages are separate methods so that serving can run them in different processes:
:meth:`Segmenter.propose` (MaskFormer), :meth:`Segmenter.classify_regions` (masked CLIP) and
:meth:`Segmenter.fuse` (ensemble + fusion + per-pixel argmax). :meth:`Segmenter.segment` chains them.
Every step follows the official evaluation inference (``models/ensemble.py``, ``models/regions.py``);
``mode="demo"`` gives the official demo's instead (:meth:`Segmenter.fuse_demo`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import ModelConfig
from .device import autocast, autocast_dtype
from .models.ensemble import (UNLABELLED, clip_probs, demo_selection, ensemble_probs, fused_labels, kept_proposals,
                              maskformer_probs)
from .models.official import DEMO_MASK_THRESHOLD, INFERENCE_MODES
from .models.ovseg import OVSegModel, build_model
from .models.regions import RegionPreprocessor
from .models.text import TextEmbedder, clean_class_names


@dataclass
class Proposals:
    """MaskFormer output for one image at its processing size (the resized image)."""

    image: torch.Tensor  # (3, h, w) float 0-255, the resized image the masks refer to
    class_embeddings: torch.Tensor  # (Q, E) unit norm
    mask_logits: torch.Tensor  # (Q, h, w)

    def binary_masks(self, threshold: float) -> torch.Tensor:
        return self.mask_logits.sigmoid() > threshold


@dataclass
class SegmentationResult:
    labels: np.ndarray  # (H, W) int32 class index per pixel at the input image's size; -1 = unlabelled
    classes: list[str]
    num_proposals: int
    num_valid_regions: int
    timings: dict[str, float] = field(default_factory=dict)

    def pixel_fractions(self) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel()[self.labels.ravel() >= 0], minlength=len(self.classes))
        total = float(self.labels.size)
        return {name: float(counts[i]) / total for i, name in enumerate(self.classes)}

    def unlabelled_fraction(self) -> float:
        """Share of pixels no class was given (only the demo inference leaves any)."""
        return float((self.labels == UNLABELLED).sum()) / float(self.labels.size)


def processing_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shorter side to ``min_size``, longer side capped at ``max_size``: detectron2's ``ResizeShortestEdge``
    at test time, its rounding (``int(x + 0.5)``) included."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB resized to ``size`` (h, w): PIL's bilinear resize of uint8 pixels, as
    detectron2's ``ResizeTransform`` does for the released models (antialiased when shrinking)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((int(size[1]), int(size[0])), Image.BILINEAR)
    return np.array(resized)  # writable, so torch.from_numpy needs no copy-on-write warning


#: The name the official demo appends to a one-name vocabulary (CLIP classifies contrastively).
DEMO_OTHERS = "others"


def vocabulary(classes: list[str], mode: str = "eval") -> list[str]:
    """The cleaned class names a request runs with; demo mode appends "others" to a single name."""
    classes = clean_class_names(classes)
    return [*classes, DEMO_OTHERS] if mode == "demo" and len(classes) == 1 else classes


def inference_settings(config, mode: str = "eval", lam: float | None = None,
                       mask_threshold: float | None = None) -> tuple[float, float]:
    """The (lambda, mask threshold) to run with: the model config's defaults, or the demo's (CLIP only,
    threshold 0.35) in demo mode; a value out of range, or a lambda in demo mode, is refused, named."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    if mode == "demo":
        if lam is not None:
            raise ValueError("the demo inference is CLIP only (the official demo's weight 0): lambda does not "
                             "apply in mode demo")
        lam, default_threshold = 1.0, DEMO_MASK_THRESHOLD
    else:
        lam = config.ensemble_lambda if lam is None else float(lam)
        default_threshold = config.mask_threshold
    threshold = default_threshold if mask_threshold is None else float(mask_threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask_threshold must be within (0, 1), got {threshold}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be within [0, 1], got {lam}")
    return lam, threshold


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()


class Segmenter:
    """Runs an :class:`OVSegModel` on images with any vocabulary."""

    def __init__(self, model: OVSegModel, text_cache_size: int = 8192, precision: str = "auto",
                 max_regions_per_forward: int = 512, skip_min_area: int = 0,
                 skip_no_object_above: float | None = None):
        autocast_dtype(precision, "cpu")  # an unknown precision is refused here, named
        self.precision = precision
        self.max_regions_per_forward = int(max_regions_per_forward)
        self.skip_min_area, self.skip_no_object_above = int(skip_min_area), skip_no_object_above
        self.model = model.eval()
        self.config = model.config
        self.text = TextEmbedder(model.clip, model.tokenizer, model.config.template_list(), cache_size=text_cache_size)
        self.regions = RegionPreprocessor(
            size=model.region_encoder.image_size, interpolation=model.config.region_interpolation
        )

    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device | None = None, **kwargs) -> Segmenter:
        """The model ``config`` names, on ``device`` (default: ``config.device``), with its inference options."""
        model = build_model(config.preset, weights=config.weights, device=device or config.device, seed=config.seed)
        return cls(model, **config.segmenter_options(), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """What the networks autocast to here (None: fp32), from ``precision`` and the model's device."""
        return autocast_dtype(self.precision, self.device)

    def resize_for_model(self, image: np.ndarray) -> torch.Tensor:
        """(3, h, w) float 0-255 on the model's device, resized to the preset's processing size."""
        height, width = image.shape[:2]
        size = processing_size(height, width, self.config.min_size, self.config.max_size)
        return image_to_tensor(resize_image(image, size)).to(self.device)

    @torch.no_grad()
    def propose(self, image: np.ndarray) -> Proposals:
        return self.propose_many([image])[0]

    @torch.no_grad()
    def propose_many(self, images: list[np.ndarray]) -> list[Proposals]:
        """MaskFormer proposals of several images, batched per padded size (see ``OpenVocabMaskFormer.propose_many``)."""
        resized = [self.resize_for_model(image) for image in images]
        outputs = self.model.maskformer.propose_many(resized, self.autocast_dtype)
        return [Proposals(r, out["class_embeddings"], out["mask_logits"]) for r, out in zip(resized, outputs)]

    def propose_each(self, images: list[np.ndarray]) -> list[Proposals]:
        """:meth:`propose` for one image, :meth:`propose_many` for several (the same computation)."""
        return [self.propose(images[0])] if len(images) == 1 else self.propose_many(images)

    def region_masks(self, proposals: Proposals, p_maskformer: torch.Tensor, threshold: float) -> torch.Tensor:
        """The binary masks the CLIP stage gets: skipped proposals (the skip options) emptied."""
        masks = proposals.binary_masks(threshold)
        keep = kept_proposals(masks, p_maskformer, self.skip_min_area, self.skip_no_object_above)
        return masks if keep is None else masks & keep.view(-1, 1, 1)

    @torch.no_grad()
    def embed_regions_many(
        self, items: list[tuple[torch.Tensor, torch.Tensor]], max_per_forward: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Masked-CLIP embeddings for the regions of several images, in shared encoder forwards.

        ``items`` are (image (3, h, w) 0-255, masks (Q, h, w) bool) pairs. Each image's regions are
        cropped separately (THE region preprocessing), then all regions go through the encoder in
        chunks of ``max_per_forward`` (default: the segmenter's), under the segmenter's precision. Returns, per item, unit-norm embeddings (K, E) of its
        non-empty masks and its (Q,) valid flags.
        """
        max_per_forward = max_per_forward or self.max_regions_per_forward
        batches = [self.regions(image.to(self.device), masks.to(self.device)) for image, masks in items]
        counts = [len(batch) for batch in batches]
        encoder = self.model.region_encoder
        if sum(counts) == 0:
            embeddings = torch.zeros(0, encoder.output_dim, device=self.device)
        else:
            images = torch.cat([b.images for b in batches])
            masks = torch.cat([b.masks for b in batches])
            with autocast(self.autocast_dtype, self.device):
                parts = [encoder(images[i : i + max_per_forward], masks[i : i + max_per_forward])
                         for i in range(0, images.shape[0], max_per_forward)]
            embeddings = F.normalize(torch.cat(parts).float(), dim=-1)
        return [(part, batch.valid) for part, batch in zip(torch.split(embeddings, counts), batches)]

    def embed_regions(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm masked-CLIP embeddings (K, E) of the non-empty ``masks`` and the (Q,) valid flags."""
        return self.embed_regions_many([(image, masks)])[0]

    def classify_regions(self, image: torch.Tensor, masks: torch.Tensor, classes: list[str]):
        """CLIP class probabilities (K, C) of the valid masks, plus the valid flags."""
        embeddings, valid = self.embed_regions(image, masks)
        return self.clip_probs(embeddings, classes), valid

    def clip_probs(self, region_embeddings: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """(K, C) CLIP class probabilities of region embeddings (from :meth:`embed_regions_many`)."""
        return clip_probs(region_embeddings, self.text(classes), self.config.temperature)

    def maskformer_probs(self, class_embeddings: torch.Tensor, classes: list[str], alone: bool = False) -> torch.Tensor:
        text = self.text(classes, alone=alone)
        return maskformer_probs(class_embeddings, text, self.model.non_object_embedding, self.config.temperature)

    @torch.no_grad()
    def fuse(
        self,
        p_maskformer: torch.Tensor,
        p_clip: torch.Tensor | None,
        valid: torch.Tensor | None,
        mask_logits: torch.Tensor,
        output_size: tuple[int, int],
        lam: float,
    ) -> np.ndarray:
        """Ensemble, fusion at the processing size, bilinear resize to ``output_size``, argmax.

        ``p_clip = valid = None``: no CLIP regions (lambda 0, MaskFormer only).
        """
        if p_clip is None or valid is None:
            valid = torch.zeros(p_maskformer.shape[0], dtype=torch.bool, device=p_maskformer.device)
            p_clip = p_maskformer[:0]
        probs, queries = ensemble_probs(p_maskformer, p_clip, valid, lam)
        logits = mask_logits if len(queries) == mask_logits.shape[0] else mask_logits[queries.to(mask_logits.device)]
        return fused_labels(probs, logits, output_size=tuple(output_size)).to(torch.int32).cpu().numpy()

    @torch.no_grad()
    def fuse_demo(
        self,
        p_clip: torch.Tensor,
        valid: torch.Tensor,
        mask_logits: torch.Tensor,
        output_size: tuple[int, int],
        threshold: float,
        classes: list[str],
    ) -> np.ndarray:
        """The official demo's fusion: CLIP probabilities of the proposals with a region, each class's
        best query kept (the others zeroed), binary masks, pixels no kept mask covers unlabelled."""
        queries = valid.to(mask_logits.device).nonzero().flatten()
        skip_others = len(classes) == 2 and classes[-1] == DEMO_OTHERS
        selected = demo_selection(p_clip, skip_last_class=skip_others) if len(queries) else p_clip
        labels = fused_labels(selected, mask_logits[queries], output_size=tuple(output_size),
                              binary_threshold=threshold, blank_unlabelled=True)
        return labels.to(torch.int32).cpu().numpy()

    def clock(self) -> float:
        """Wall-clock seconds after the device's queued work is done (so stage timings are honest on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def settings(self, mode: str = "eval", lam: float | None = None,
                 mask_threshold: float | None = None) -> tuple[float, float]:
        """The (lambda, mask threshold) a request runs with (see :func:`inference_settings`)."""
        return inference_settings(self.config, mode, lam, mask_threshold)

    @torch.no_grad()
    def segment(self, image: np.ndarray, classes: list[str], lam: float | None = None,
                mask_threshold: float | None = None, mode: str = "eval") -> SegmentationResult:
        """Semantic map of ``image`` ((H, W, 3) uint8 RGB) over ``classes``, at the image's size.

        ``mode="demo"``: the official demo's inference (see :meth:`fuse_demo`); a one-name vocabulary
        gets "others" appended, as there, and the result's classes include it.
        """
        return self.segment_many([image], classes, lam, mask_threshold, mode)[0]

    @torch.no_grad()
    def segment_many(self, images: list[np.ndarray], classes: list[str], lam: float | None = None,
                     mask_threshold: float | None = None, mode: str = "eval") -> list[SegmentationResult]:
        """:meth:`segment` of several images: batched MaskFormer forwards, their regions through CLIP
        together; each result equals the image's own run (float noise). Stage timings are the batch's
        per image."""
        lam, threshold = self.settings(mode, lam, mask_threshold)
        classes = vocabulary(classes, mode)
        count, timings = max(1, len(images)), {}
        start = self.clock()
        proposals = self.propose_each(images)
        now = self.clock()
        timings["proposals_s"], start = (now - start) / count, now
        p_mf = [self.maskformer_probs(p.class_embeddings, classes) for p in proposals]
        clip = [(None, None)] * len(images)  # lambda 0: MaskFormer only, the CLIP stage is skipped entirely
        if lam > 0.0:
            clip = self.classify_many(proposals, p_mf, threshold, classes)
        now = self.clock()
        timings["regions_s"] = (now - start) / count
        results = []
        for image, props, probs, (p_clip, valid) in zip(images, proposals, p_mf, clip):
            start = self.clock()
            if mode == "demo":
                labels = self.fuse_demo(p_clip, valid, props.mask_logits, image.shape[:2], threshold, classes)
            else:
                labels = self.fuse(probs, p_clip, valid, props.mask_logits, image.shape[:2], lam)
            results.append(SegmentationResult(
                labels=labels, classes=classes, num_proposals=int(probs.shape[0]),
                num_valid_regions=0 if valid is None else int(valid.sum()),
                timings={**timings, "fusion_s": self.clock() - start}))
        return results

    def classify_many(self, proposals: list[Proposals], p_maskformer: list[torch.Tensor], threshold: float,
                      classes: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(CLIP probabilities (K, C), valid flags (Q,)) per image; all images' regions in shared forwards."""
        items = [(p.image, self.region_masks(p, probs, threshold)) for p, probs in zip(proposals, p_maskformer)]
        if len(items) == 1:  # one image: its own stage call, as the stage's callers (and counters) expect
            return [self.classify_regions(*items[0], classes)]
        return [(self.clip_probs(emb, classes), valid) for emb, valid in self.embed_regions_many(items)]

    @torch.no_grad()
    def segment_settings(
        self, image: np.ndarray, classes: list[str], settings: list[tuple[float, float]]
    ) -> list[np.ndarray]:
        """(H, W) labels for each (lambda, mask threshold) setting, in the order of ``settings``.

        Each equals :meth:`segment` with that setting, but the stages that do not depend on lambda
        are shared: proposals and MaskFormer probabilities once, CLIP regions once per threshold.
        """
        return self.segment_settings_many([image], classes, settings)[0]

    @torch.no_grad()
    def segment_settings_many(self, images: list[np.ndarray], classes: list[str],
                              settings: list[tuple[float, float]]) -> list[list[np.ndarray]]:
        """:meth:`segment_settings` of several images, batched as :meth:`segment_many` batches."""
        classes = clean_class_names(classes)
        by_threshold: dict[float, list[tuple[int, float]]] = {}
        for index, (lam, threshold) in enumerate(settings):
            by_threshold.setdefault(threshold, []).append((index, lam))
        labels: list[list[np.ndarray | None]] = [[None] * len(settings) for _ in images]
        proposals = self.propose_each(images)
        p_mf = [self.maskformer_probs(p.class_embeddings, classes) for p in proposals]
        for threshold, group in by_threshold.items():
            clip = [(None, None)] * len(images)  # lambda 0 everywhere: the CLIP stage is not needed
            if any(lam > 0.0 for _, lam in group):
                clip = self.classify_many(proposals, p_mf, threshold, classes)
            for n, (image, props, probs, (p_clip, valid)) in enumerate(zip(images, proposals, p_mf, clip)):
                for index, lam in group:
                    labels[n][index] = self.fuse(probs, p_clip, valid, props.mask_logits, image.shape[:2], lam)
        return labels

    # ------------------------------------------------------------------------------------------
    # The paper's oracle analysis (section 1): which of the two stages limits the result?

    def _truth_at(self, truth: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """A ground-truth map (class index, -1 ignore) nearest-resized to the processing ``size``."""
        tensor = torch.from_numpy(np.ascontiguousarray(truth)).to(self.device, torch.float32)[None, None]
        return F.interpolate(tensor, size=tuple(size), mode="nearest")[0, 0].long()

    @torch.no_grad()
    def oracle_masks(self, image: np.ndarray, truth: np.ndarray, classes: list[str]) -> np.ndarray:
        """Ground-truth masks classified by the masked CLIP: each class region of ``truth`` (H, W; -1 =
        ignore) gets the class CLIP gives its region (the shared region preprocessing, at the
        processing size). Ignore pixels come back as 0; they are not scored."""
        classes = clean_class_names(classes)
        resized = self.resize_for_model(image)
        small = self._truth_at(truth, resized.shape[-2:])
        present = [int(c) for c in np.unique(truth) if c >= 0]
        labels = np.zeros(truth.shape, np.int32)
        if not present:
            return labels
        masks = small[None] == torch.tensor(present, device=self.device).view(-1, 1, 1)
        embeddings, valid = self.embed_regions(resized, masks)
        predicted = self.clip_probs(embeddings, classes).argmax(dim=1).tolist() if len(embeddings) else []
        for region, k in zip(predicted, valid.nonzero().flatten().tolist()):
            labels[truth == present[k]] = region
        return labels

    @torch.no_grad()
    def oracle_labels(self, image: np.ndarray, truth: np.ndarray, classes: list[str],
                      mask_threshold: float | None = None) -> np.ndarray:
        """MaskFormer proposals labelled by an oracle: each proposal takes the ground-truth class its
        binary mask overlaps best (IoU at the processing size; none: left out), then the official
        fusion (sigmoid masks, bilinear resize, argmax) makes the map."""
        classes = clean_class_names(classes)
        threshold = self.config.mask_threshold if mask_threshold is None else float(mask_threshold)
        proposals = self.propose(image)
        small = self._truth_at(truth, proposals.mask_logits.shape[-2:]).flatten()
        onehot = F.one_hot(small.clamp(min=0), len(classes)).float() * (small >= 0).float()[:, None]  # (hw, C)
        binary = proposals.binary_masks(threshold).flatten(1).float()  # (Q, hw)
        overlap = binary @ onehot
        iou = overlap / (binary.sum(1, keepdim=True) + onehot.sum(0)[None] - overlap).clamp(min=1)
        probs = F.one_hot(iou.argmax(1), len(classes)).float() * (overlap.amax(1, keepdim=True) > 0)
        return fused_labels(probs, proposals.mask_logits, output_size=truth.shape).to(torch.int32).cpu().numpy()
