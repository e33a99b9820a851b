"""Small building blocks named like detectron2's, so released MaskFormer weights map onto them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dNorm(nn.Conv2d):
    """A conv with an optional ``norm`` submodule and activation (keys ``x.weight``, ``x.norm.*``)."""

    def __init__(self, *args, norm: nn.Module | None = None, activation: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (keys ``layers.{i}.weight``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine position encoding for a (B, C, H, W) feature map (no parameters)."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        eps = 1e-6
        y_embed = torch.arange(1, height + 1, device=x.device, dtype=torch.float32)
        x_embed = torch.arange(1, width + 1, device=x.device, dtype=torch.float32)
        y_embed = (y_embed / (height + eps) * self.scale).view(height, 1).expand(height, width)
        x_embed = (x_embed / (width + eps) * self.scale).view(1, width).expand(height, width)
        dim_t = torch.arange(self.num_pos_feats, device=x.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=3).flatten(2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=3).flatten(2)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
        return pos.unsqueeze(0).expand(batch, -1, -1, -1).to(x.dtype)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)
