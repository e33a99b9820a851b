"""MaskFormer backbones: each returns a dict ``res2..res5`` of feature maps (strides 4..32)."""

from __future__ import annotations

from torch import nn

from .resnet import DeepLabResNet
from .swin import SwinTransformer
from .tiny import TinyBackbone

BACKBONES = ("r101c", "swinb", "tiny")


def build_backbone(name: str) -> nn.Module:
    if name == "r101c":
        return DeepLabResNet(depth=101, stem_channels=128, res5_multi_grid=(1, 2, 4))
    if name == "swinb":
        return SwinTransformer(
            embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12, pretrain_img_size=384
        )
    if name == "tiny":
        return TinyBackbone()
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "DeepLabResNet", "SwinTransformer", "TinyBackbone", "build_backbone"]
