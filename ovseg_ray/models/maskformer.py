"""Open-vocabulary MaskFormer: backbone, FPN pixel decoder and query predictor.

Parameter names mirror MaskFormer's (``backbone.*``, ``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*``) so that released checkpoints map onto this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..device import autocast
from .backbones import build_backbone
from .pixel_decoder import FPNPixelDecoder
from .predictor import OpenVocabPredictor

# detectron2's ImageNet statistics in 0-255 RGB, used by the released MaskFormer weights.
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


class MaskFormerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("r101c", description="r101c, swinb or tiny")
    hidden_dim: int = Field(256, gt=0)
    num_queries: int = Field(100, gt=0)
    nheads: int = Field(8, gt=0)
    dim_feedforward: int = Field(2048, gt=0)
    dec_layers: int = Field(6, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    conv_dim: int = Field(256, gt=0)
    mask_dim: int = Field(256, gt=0)
    embed_hidden_dim: int = Field(1024, gt=0)
    embed_layers: int = Field(2, gt=0)
    size_divisibility: int = Field(32, gt=0)


class SemSegHead(nn.Module):
    def __init__(self, pixel_decoder: FPNPixelDecoder, predictor: OpenVocabPredictor):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.predictor(features["res5"], self.pixel_decoder(features))


class OpenVocabMaskFormer(nn.Module):
    def __init__(self, config: MaskFormerConfig, embedding_dim: int):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone)
        pixel_decoder = FPNPixelDecoder(self.backbone.out_channels, config.conv_dim, config.mask_dim)
        predictor = OpenVocabPredictor(
            in_channels=self.backbone.out_channels["res5"],
            embedding_dim=embedding_dim,
            hidden_dim=config.hidden_dim,
            num_queries=config.num_queries,
            nheads=config.nheads,
            dim_feedforward=config.dim_feedforward,
            dec_layers=config.dec_layers,
            dropout=config.dropout,
            mask_dim=config.mask_dim,
            embed_hidden_dim=config.embed_hidden_dim,
            embed_layers=config.embed_layers,
        )
        self.sem_seg_head = SemSegHead(pixel_decoder, predictor)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    def normalize_and_pad(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Normalise (3, H, W) 0-255 images and zero-pad them to one size divisible by the stride."""
        height, width = self.padded_size(max(img.shape[-2] for img in images), max(img.shape[-1] for img in images))
        batch = self.pixel_mean.new_zeros((len(images), 3, height, width))
        for index, img in enumerate(images):
            normalized = (img.to(batch.device, torch.float32) - self.pixel_mean) / self.pixel_std
            batch[index, :, : img.shape[-2], : img.shape[-1]] = normalized
        return batch

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs for a normalised, padded batch: every decoder layer's predictions."""
        return self.sem_seg_head(self.backbone(batch))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image is zero-padded to on its own: each side up to the size divisibility."""
        div = self.config.size_divisibility
        return math.ceil(height / div) * div, math.ceil(width / div) * div

    @torch.no_grad()
    def propose(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One (3, H, W) 0-255 image -> unit-norm query class embeddings (Q, E), mask logits (Q, H, W).

        Mask logits come at the image's own size (upsampled from stride 4, padding cropped off).
        """
        return self.propose_many([image])[0]

    @torch.no_grad()
    def propose_many(self, images: list[torch.Tensor], autocast_dtype: torch.dtype | None = None,
                     mixed_padding: bool = False) -> list[dict[str, torch.Tensor]]:
        """:meth:`propose` for several images, one forward per group of images that pad to one size.

        As detectron2 does, a group is zero-padded to a common size divisible by the stride, run in one
        forward, and each image's valid region is cropped from the upsampled mask logits. Only images
        with the same padded size share a forward (by default), so each result equals the image's own
        run up to float noise: mixing sizes (``mixed_padding``, detectron2's batches) lets the
        backbone's convolutions and the decoder's attention see other padding, which moves the outputs.
        The networks run under ``autocast_dtype`` (None = fp32); the outputs are fp32.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            key = (0, 0) if mixed_padding else self.padded_size(*image.shape[-2:])
            groups.setdefault(key, []).append(index)
        results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        for indices in groups.values():
            batch = self.normalize_and_pad([images[i] for i in indices])
            with autocast(autocast_dtype, self.pixel_mean.device):
                outputs = self(batch)
            logits = F.interpolate(outputs["mask_logits"][-1].float(), size=batch.shape[-2:], mode="bilinear",
                                   align_corners=False)
            embeddings = F.normalize(outputs["class_embeddings"][-1].float(), dim=-1)
            for position, index in enumerate(indices):
                height, width = images[index].shape[-2:]
                results[index] = {"class_embeddings": embeddings[position],
                                  "mask_logits": logits[position, :, :height, :width]}
        return results
