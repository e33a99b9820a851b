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
        div = self.config.size_divisibility
        height = max(img.shape[-2] for img in images)
        width = max(img.shape[-1] for img in images)
        height, width = math.ceil(height / div) * div, math.ceil(width / div) * div
        batch = self.pixel_mean.new_zeros((len(images), 3, height, width))
        for index, img in enumerate(images):
            normalized = (img.to(batch.device, torch.float32) - self.pixel_mean) / self.pixel_std
            batch[index, :, : img.shape[-2], : img.shape[-1]] = normalized
        return batch

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw outputs for a normalised, padded batch: every decoder layer's predictions."""
        return self.sem_seg_head(self.backbone(batch))

    @torch.no_grad()
    def propose(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One (3, H, W) 0-255 image -> unit-norm query class embeddings (Q, E), mask logits (Q, H, W).

        Mask logits come at the image's own size (upsampled from stride 4, padding cropped off).
        """
        height, width = image.shape[-2:]
        batch = self.normalize_and_pad([image])
        outputs = self(batch)
        logits = F.interpolate(
            outputs["mask_logits"][-1], size=batch.shape[-2:], mode="bilinear", align_corners=False
        )[0, :, :height, :width]
        class_embeddings = F.normalize(outputs["class_embeddings"][-1][0], dim=-1)
        return {"class_embeddings": class_embeddings, "mask_logits": logits}
