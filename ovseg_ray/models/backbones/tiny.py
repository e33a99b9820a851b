"""A four-stage conv backbone small enough for CPU tests (random weights, strides 4..32)."""

from __future__ import annotations

from torch import nn

from ..layers import Conv2dNorm, group_norm
from .staged import StagedBackbone


class TinyBackbone(StagedBackbone):
    def __init__(self, channels: tuple[int, int, int, int] = (16, 32, 48, 64)):
        super().__init__()
        self.stem = Conv2dNorm(3, channels[0], 3, stride=4, padding=1, bias=False,
                               norm=group_norm(channels[0], 8), activation=nn.ReLU())
        in_ch = channels[0]
        for index, (name, out_ch) in enumerate(zip(self.stage_names, channels)):
            stride = 1 if index == 0 else 2
            self.add_module(
                name,
                nn.Sequential(
                    Conv2dNorm(in_ch, out_ch, 3, stride=stride, padding=1, bias=False,
                               norm=group_norm(out_ch, 8), activation=nn.ReLU()),
                    Conv2dNorm(out_ch, out_ch, 3, padding=1, bias=False,
                               norm=group_norm(out_ch, 8), activation=nn.ReLU()),
                ),
            )
            in_ch = out_ch
        self.out_channels = dict(zip(self.stage_names, channels))
