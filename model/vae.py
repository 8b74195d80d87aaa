"""The SD 1.x autoencoder (LDM ``AutoencoderKL``): image [B, 3, H, W] <-> latent [B, 4, H/8, W/8].

Module attribute names equal the checkpoint keys below ``first_stage_model.``. The latent scaling factor
(0.18215 for SD 1.x) is not applied here: the pipeline multiplies after encode and divides before decode.
Shape comments are for SD 1.5 at a 512x512 image, batch B.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import attention
from model.layers import Upsample

GROUPS = 32


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))  # a list (from JSON) would not compare equal
        for mult in self.ch_mult:
            if (self.ch * mult) % GROUPS:
                raise ValueError(f"ch * ch_mult must be a multiple of {GROUPS}, got {self.ch * mult}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v and proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.cpu_attention: Callable[..., torch.Tensor] | None = None  # set on the CPU: model.cpu_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))  # [B,1,HW,C]
        h = attention(q, k, v) if self.cpu_attention is None else self.cpu_attention(q, k, v)
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only, then convolves unpadded


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (``down.I``) or decoder (``up.I``): res blocks, then an optional resample."""

    def __init__(
        self, blocks: list[ResnetBlock], downsample: Downsample | None = None, upsample: Upsample | None = None
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample  # None registers no module, so the lowest/highest level has no such keys
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        ch = c.ch
        levels = []
        for i, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(ch, c.ch * mult))
                ch = c.ch * mult
            levels.append(Level(blocks, downsample=Downsample(ch) if i != len(c.ch_mult) - 1 else None))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(ch)
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, 128, 512, 512]
        for level in self.down:
            h = level(h)  # ... [B, 512, 64, 64]
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 8, 64, 64]


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, c.ch * c.ch_mult[i]))
                ch = c.ch * c.ch_mult[i]
            levels.append(Level(blocks, upsample=Upsample(ch) if i != 0 else None))
        # checkpoints index up.I by resolution level (up.0 = full size), the reverse of the order they run in
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, 512, 64, 64]
        for level in reversed(self.up):
            h = level(h)  # ... [B, 128, 512, 512]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, 512, 512]


class LatentDistribution(NamedTuple):
    """The encoder's diagonal Gaussian over latents (unscaled); unpacks as ``mean, logvar``."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + std * noise, with noise ~ N(0, 1) of the latent's shape drawn by the caller (seeded per sample)."""
        return self.mean + self.std * noise.to(self.mean)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """x [B, 3, H, W] in [-1, 1] -> Gaussian over latents [B, 4, H/8, W/8]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return LatentDistribution(mean, logvar.clamp(-30.0, 20.0))  # clamp as LDM: keeps exp() finite

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, 4, h, w] (unscaled) -> image [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))
