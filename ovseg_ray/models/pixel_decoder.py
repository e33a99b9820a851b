"""MaskFormer's FPN pixel decoder: per-pixel mask features at stride 4 (keys like detectron2's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Conv2dNorm, group_norm


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over ``res2..res5``; ``adapter_i`` are lateral 1x1 convs, ``layer_i`` 3x3 outputs."""

    def __init__(self, in_channels: dict[str, int], conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        self.in_features = ["res2", "res3", "res4", "res5"]
        for index, name in enumerate(self.in_features):
            channels = in_channels[name]
            if name != "res5":
                self.add_module(
                    f"adapter_{index + 1}",
                    Conv2dNorm(channels, conv_dim, 1, bias=False, norm=group_norm(conv_dim)),
                )
                in_ch = conv_dim
            else:
                in_ch = channels
            self.add_module(
                f"layer_{index + 1}",
                Conv2dNorm(in_ch, conv_dim, 3, padding=1, bias=False, norm=group_norm(conv_dim), activation=nn.ReLU()),
            )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.layer_4(features["res5"])
        for index in (3, 2, 1):
            lateral = getattr(self, f"adapter_{index}")(features[self.in_features[index - 1]])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{index}")(y)
        return self.mask_features(y)
