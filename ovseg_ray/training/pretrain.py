"""Contrastive image-caption pretraining of a CLIP from scratch (plain PyTorch, no Ray).

The stand-in for OpenAI's CLIP in reproductions and custom domains: both towers train on whole
images and their captions (symmetric InfoNCE, negatives from every worker's batch, a learnable
temperature as CLIP's), and, like the real CLIP, it never sees a masked image. Each image is decoded
once (``decode_captioned``); every pass draws a random resized crop (90-100 % of the area) at the
tower's input size, CLIP-normalised, and one of the image's captions (``draw_views``), in the loop.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from torch import nn

from ..config import ModelPreset, StrictModel
from ..data import storage
from ..data.images import decode_image
from ..models.clip import CLIP_MEAN, CLIP_STD, clip_tokenizer, create_clip
from ..weights.checkpoint import save_checkpoint
from . import runs
from .clip_steps import OPEN_CLIP_MODEL, cosine_schedule, gather_rows, resolve_precision, world_size
from .losses import contrastive_loss

RUN_RECORD = "pretrain_clip_config.json"
CROP_AREA = (0.9, 1.0)  # random resized crop: the share of the image's area each view keeps
CLIP_FILE = "clip.safetensors"  # our CLIP-only layout (clip.*): --clip-weights, model.clip_weights


class CaptionDataSection(StrictModel):
    images: str = Field(description="image folder (or s3:// prefix) of the captions file's images")
    captions: str = Field(description="COCO captions JSON (path or s3://)")
    max_images: int | None = Field(None, ge=1, description="only the first N images (by id)")
    preprocess_cpus: float = Field(0.5, gt=0, description="CPUs per Ray Data decoding task")
    preprocess_batch_rows: int = Field(32, ge=1, description="images per decoding task batch")
    max_captions: int = Field(8, ge=1, description="captions kept per image (COCO has 5-7); each pass draws one")
    cache_decoded: bool = Field(True, description="decode every image once and keep it (uint8, a little above "
                                "the CLIP input size: 14 KB an image for the tiny CLIP, 170 KB for ViT-B/16) in "
                                "Ray's object store for all epochs; false: decode it again every epoch, for "
                                "corpora larger than the object store")


class PretrainOptimSection(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2, description="images per worker per step")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0


class PretrainRunSection(runs.RunSection):
    storage_path: str = Field("runs/pretrain_clip", description="checkpoints and outputs (path or s3://)")
    name: str = Field("pretrain-clip", min_length=1, description="run name: STORAGE/NAME holds the run")


class PretrainClipConfig(StrictModel):
    preset: ModelPreset = Field("tiny", description="the preset whose CLIP architecture is trained")
    data: CaptionDataSection
    optim: PretrainOptimSection = PretrainOptimSection()
    run: PretrainRunSection = PretrainRunSection()

    def fingerprint(self) -> dict:
        return self.model_dump(mode="json", include={"preset", "data", "optim"})


def cache_size(size: int) -> int:
    """Side of the square an image is decoded to once: its smallest crop (90 % of the area) still
    has ``size`` pixels a side, so every view is a downscale, as from the full image."""
    return math.ceil(size / math.sqrt(CROP_AREA[0]))


def decode_captioned(batch: dict, arch: str, size: int, max_captions: int = 8) -> dict:
    """Ray Data ``map_batches`` (numpy), run once per image: decode it, squash it to the cache square
    (uint8, ``cache_size(size)``) and tokenise up to ``max_captions`` of its captions. The random views
    are drawn later, every pass, by :func:`draw_views`. Unreadable images come back with ``ok`` False
    and the reason."""
    tokenizer = clip_tokenizer(arch)
    side, count = cache_size(size), len(batch["image_uri"])
    images = np.zeros((count, side, side, 3), np.uint8)
    ok, errors, per_image = np.zeros(count, bool), [""] * count, []
    for row in range(count):
        uri, captions = str(batch["image_uri"][row]), [str(c) for c in batch["captions"][row] if c]
        per_image.append(captions[:max_captions])
        try:
            image = decode_image(storage.read_bytes(uri), source=uri)
        except (OSError, ValueError) as exc:
            errors[row] = str(exc)
            continue
        images[row] = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))
        ok[row] = bool(captions)
        if not captions:
            errors[row] = f"{uri}: no caption"
    texts = [text for captions in per_image for text in captions]
    flat = tokenizer(texts).numpy().astype(np.int32) if texts else np.zeros((0, 1), np.int32)
    tokens = np.zeros((count, max_captions, flat.shape[1] if texts else 77), np.int32)
    numbers, at = np.array([len(c) for c in per_image], np.int64), 0
    for row, number in enumerate(numbers):
        tokens[row, :number] = flat[at:at + number]
        at += number
    return {"image": images, "tokens": tokens, "num_captions": numbers, "ok": ok,
            "error": np.array(errors, dtype=object)}


def draw_views(images: torch.Tensor, tokens: torch.Tensor, num_captions: torch.Tensor, size: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training view per cached image: a random crop of 90-100 % of its area resized (bicubic) to
    ``size`` and CLIP-normalised (B, 3, size, size), and one of its captions drawn (B, L) long."""
    side = images.shape[1]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    views = torch.empty(len(images), 3, size, size)
    for row, image in enumerate(images):
        area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * float(torch.rand((), generator=generator))
        crop = max(1, int(side * math.sqrt(area)))
        y0, x0 = (int(torch.randint(side - crop + 1, (), generator=generator)) for _ in range(2))
        patch = image[y0:y0 + crop, x0:x0 + crop].permute(2, 0, 1)[None].float()
        views[row] = F.interpolate(patch, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 255)
    picks = (torch.rand(len(tokens), generator=generator) * num_captions.clamp(min=1)).long()
    return (views - mean) / std, tokens[torch.arange(len(tokens)), picks].long()


class PairEncoder(nn.Module):
    """Unit-norm image and text embeddings and CLIP's temperature: the module DDP wraps."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        text = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
        return image, text, self.clip.logit_scale.exp().clamp(max=100.0)


class CaptionTrainer:
    """One step of image-caption contrastive training."""

    def __init__(self, clip, *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                 precision: str = "auto", device: torch.device | str = "cpu", wrap=lambda module: module):
        self.clip = clip.to(device)
        self.device = torch.device(device)
        for param in clip.parameters():
            param.requires_grad_(True)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.module = wrap(PairEncoder(clip))
        self.module.train()
        decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = cosine_schedule(self.optimizer, warmup_steps, total_steps)

    def step(self, images: torch.Tensor, tokens: torch.Tensor, scale: float = 1.0) -> tuple[float, int, int]:
        """(loss, local images whose own caption is the nearest of the global batch, local count);
        ``scale`` 0 steps for the collectives' sake without learning."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            image, text, scale = self.module(images.to(self.device), tokens.to(self.device))
        all_image, offset = gather_rows(image)
        all_text, _ = gather_rows(text)
        ids = torch.arange(all_image.shape[0], device=self.device)
        loss = contrastive_loss(all_image, all_text, ids, scale)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * world_size() * scale).backward()  # DDP averages gradients; each rank holds its share
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            nearest = (image.detach() @ all_text.detach().T).argmax(dim=1)
            correct = int((nearest == torch.arange(offset, offset + len(image), device=self.device)).sum())
        return float(loss.detach()), correct, int(len(image))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_clip(preset: str, seed: int):
    from ..models.ovseg import load_preset

    config = load_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_clip(config.clip_arch), config


def export_clip(clip, out_dir: str, metadata: dict[str, str]) -> dict[str, str]:
    """``clip.safetensors`` (our layout: ``--clip-weights`` / ``model.clip_weights``) and
    ``open_clip_model.safetensors`` (``open_clip.create_model(arch, pretrained=PATH)``)."""
    paths = {"clip": storage.join(out_dir, CLIP_FILE), "open_clip_model": storage.join(out_dir, OPEN_CLIP_MODEL)}
    save_checkpoint({f"clip.{k}": v for k, v in clip.state_dict().items()}, paths["clip"],
                    metadata={**metadata, "format": "ovseg-ray", "part": "clip"})
    save_checkpoint(clip, paths["open_clip_model"], metadata={**metadata, "format": "open_clip"})
    return paths
