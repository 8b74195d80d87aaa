"""Layers the UNet and the VAE share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Upsample(nn.Module):
    """Nearest-neighbour upsampling, then a 3x3 convolution (LDM's Upsample, in the UNet and the VAE decoder)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Upsample to ``size`` (default: twice the input's). The UNet passes the size of the skip connection
        that comes next, not blindly x2: a 33-row map must go back to 65 rows, not 66."""
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
