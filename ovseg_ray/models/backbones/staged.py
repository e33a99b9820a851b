"""Shared shape of the convolutional backbones: a stem, then stages ``res2..res5`` run in order."""

from __future__ import annotations

import torch
from torch import nn

STAGE_NAMES = ("res2", "res3", "res4", "res5")  # strides 4, 8, 16, 32


class StagedBackbone(nn.Module):
    """Subclasses set ``self.stem`` and one submodule per name in ``STAGE_NAMES``."""

    stage_names = STAGE_NAMES

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        features = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            features[name] = x
        return features
