"""ResNet with the DeepLab three-conv stem ("R101c"), laid out like detectron2's DeepLab ResNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers import Conv2dNorm
from .staged import StagedBackbone

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, relu: bool = True) -> Conv2dNorm:
    padding = dilation * (kernel // 2)
    return Conv2dNorm(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=False,
        norm=FrozenBatchNorm2d(out_ch),
        activation=nn.ReLU(inplace=True) if relu else None,
    )


class DeepLabStem(nn.Module):
    def __init__(self, out_channels: int = 128):
        super().__init__()
        self.conv1 = _conv(3, out_channels // 2, 3, stride=2)
        self.conv2 = _conv(out_channels // 2, out_channels // 2, 3)
        self.conv3 = _conv(out_channels // 2, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride and dilation here) -> 1x1, with a projection shortcut when shapes change."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, dilation: int):
        super().__init__()
        self.shortcut = _conv(in_ch, out_ch, 1, stride=stride, relu=False) if (in_ch != out_ch or stride != 1) else None
        self.conv1 = _conv(in_ch, mid_ch, 1)
        self.conv2 = _conv(mid_ch, mid_ch, 3, stride=stride, dilation=dilation)
        self.conv3 = _conv(mid_ch, out_ch, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(self.conv3(self.conv2(self.conv1(x))) + identity)


class DeepLabResNet(StagedBackbone):
    def __init__(self, depth: int = 101, stem_channels: int = 128, res5_multi_grid: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        self.stem = DeepLabStem(stem_channels)
        in_ch = stem_channels
        self.out_channels = {}
        for index, (name, blocks) in enumerate(zip(self.stage_names, STAGE_BLOCKS[depth])):
            mid_ch, out_ch = 64 * 2**index, 256 * 2**index
            if name == "res5" and len(res5_multi_grid) != blocks:
                raise ValueError(f"res5_multi_grid needs {blocks} entries, got {res5_multi_grid}")
            stage = []
            for block in range(blocks):
                stride = 1 if (index == 0 or block > 0) else 2
                dilation = res5_multi_grid[block] if name == "res5" else 1
                stage.append(Bottleneck(in_ch, mid_ch, out_ch, stride, dilation))
                in_ch = out_ch
            self.add_module(name, nn.Sequential(*stage))
            self.out_channels[name] = out_ch
