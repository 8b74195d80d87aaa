"""The SD denoising UNet (the LDM "openaimodel" network, and its SDXL form from Stability's generative-models).

Module attribute names equal the checkpoint keys below ``model.diffusion_model.``, so an original single-file
checkpoint loads with no renaming. Shape comments are for SD 1.5 at a 512x512 image (64x64 latent), batch B.

SDXL adds two things: a transformer depth per level (base: none, 2, 10; the middle block as the last level), and
``label_emb``, an MLP of the "vector" conditioning ``y`` (the pooled text embedding and the Fourier-embedded size
and crop values, ``model/sdxl.py``) whose output is added to the timestep embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import attention
from model.layers import Upsample

GROUPS = 32  # every GroupNorm in LDM uses 32 groups


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors (2**level) whose blocks get attention
    num_heads: int = 8
    num_head_channels: int = -1  # SD 2.x style: fixed channels per head; -1 = use num_heads
    transformer_depth: int | tuple[int, ...] = 1  # one for all levels, or per level (SDXL); a tuple once built
    transformer_depth_middle: int | None = None  # None: the last level's
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 1.x: 1x1 conv proj_in/proj_out; SD 2.x: linear
    upcast_attention: bool = False  # attention scores in fp32 under fp16/bf16 (SD 2.x; model/attention.py)
    adm_in_channels: int = 0  # SDXL: width of the vector conditioning y (label_emb); 0 = none (SD 1.x, 2.x)
    time_cond_proj_dim: int = 0  # LCM-distilled UNets: width of the guidance-scale embedding (model/lcm.py); 0 = none

    def __post_init__(self) -> None:
        # one spelling per architecture, so configs compare equal: tuples, attention factors high to low as in LDM
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions), reverse=True)))
        depth = self.transformer_depth
        depths = (depth,) * len(self.channel_mult) if isinstance(depth, int) else tuple(depth)
        if len(depths) != len(self.channel_mult) or min(depths) < 0:
            raise ValueError(f"transformer_depth must be one count, or one per level ({len(self.channel_mult)}), "
                             f"got {depth}")
        middle = depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        object.__setattr__(self, "transformer_depth_middle", middle)
        # levels without attention have no transformer: 0, however the config spelled it
        depths = tuple(d if 2**level in self.attention_resolutions else 0 for level, d in enumerate(depths))
        object.__setattr__(self, "transformer_depth", depths)
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            if channels % GROUPS:
                raise ValueError(f"model_channels * channel_mult must be a multiple of {GROUPS}, got {channels}")
            heads, head_dim = self.heads(channels)
            if heads * head_dim != channels:
                raise ValueError(f"{channels} channels cannot be split into {heads} attention heads evenly")
        if self.model_channels % 2:
            raise ValueError(f"model_channels must be even (sin/cos timestep embedding), got {self.model_channels}")

    def depth(self, level: int) -> int:
        """Transformer blocks of the attention layers at ``level`` (-1: the middle block)."""
        if level == -1:
            assert isinstance(self.transformer_depth_middle, int)
            return self.transformer_depth_middle
        assert isinstance(self.transformer_depth, tuple)
        return self.transformer_depth[level]

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of an attention layer over ``channels`` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps: cos half first, then sin, as LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # index 2 held the training-time dropout; the Identity keeps the conv at checkpoint index 3
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # [B, out, h, w]
        h = h + self.emb_layers(emb)[:, :, None, None]  # time conditioning, broadcast over space
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (self-attention when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # ".0": index 1 was dropout
        self.cpu_attention: Callable[..., torch.Tensor] | None = None  # set on the CPU: model.cpu_attention

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # [B, heads, tokens, head_dim]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attend = attention if self.cpu_attention is None else self.cpu_attention
        out = attend(q, k, v, context_mask, upcast=self.upcast)  # [B, heads, N, head_dim]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # index 1 held the training-time dropout; checkpoints name the output layer ff.net.2
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, upcast: bool = False) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # self-attention over image tokens
        x = x + self.attn2(self.norm2(x), context, context_mask)  # cross-attention to the text tokens
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the h*w positions of a feature map, conditioned on the text context."""

    def __init__(self, channels: int, config: UNetConfig, depth: int) -> None:
        super().__init__()
        heads, head_dim = config.heads(channels)
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.linear = linear = config.use_linear_in_transformer
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, config.context_dim, heads, head_dim, config.upcast_attention)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # [B, H*W, C]: one token per position
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)  # odd sizes round up: 65 -> 33

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers run in order, each fed what it needs."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, upsample_size: tuple[int, int] | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(layer, Upsample):
                assert upsample_size is not None, "an Upsample block needs the size of the next skip connection"
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class GuidanceProjection(nn.Module):
    """An LCM-distilled UNet's guidance input: the guidance-scale embedding projected onto the sinusoidal timestep
    embedding, which it is added to (diffusers' ``TimestepEmbedding.cond_proj``)."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(dim, channels, bias=False)


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = c = config
        emb_ch = 4 * c.model_channels
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if c.time_cond_proj_dim:  # LCM-distilled: time_embedding.cond_proj, the key real single files carry
            self.time_embedding = GuidanceProjection(c.time_cond_proj_dim, c.model_channels)
        if c.adm_in_channels:  # SDXL: label_emb.0.0 / label_emb.0.2, as generative-models nests it
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            )

        ch = c.model_channels
        self.input_blocks = nn.ModuleList([TimestepBlock([nn.Conv2d(c.in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]  # channels of each input block's output, consumed in reverse by output_blocks
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, c.model_channels * mult)]
                ch = c.model_channels * mult
                if 2**level in c.attention_resolutions:
                    layers.append(SpatialTransformer(ch, c, c.depth(level)))
                self.input_blocks.append(TimestepBlock(layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepBlock(
            [ResBlock(ch, emb_ch, ch), SpatialTransformer(ch, c, c.depth(-1)), ResBlock(ch, emb_ch, ch)]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, c.model_channels * mult)]
                ch = c.model_channels * mult
                if 2**level in c.attention_resolutions:
                    layers.append(SpatialTransformer(ch, c, c.depth(level)))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(layers))

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, in, h, w], timesteps [B] or [] (int or float), context [B, 77 * chunks, 768] -> eps [B, out, h, w].

        ``context_mask`` [B, 77 * chunks] bool: the context positions each row attends to (None = all).
        ``y`` [B, adm_in_channels]: SDXL's vector conditioning, required exactly when the config has it.
        ``timestep_cond`` [B, time_cond_proj_dim]: an LCM-distilled UNet's guidance-scale embedding, likewise."""
        t = timesteps.to(x.device).reshape(-1).expand(x.shape[0])
        t_emb = timestep_embedding(t, self.config.model_channels).to(x.dtype)
        if (timestep_cond is None) != (not self.config.time_cond_proj_dim):
            raise ValueError(f"this UNet takes {'a' if self.config.time_cond_proj_dim else 'no'} guidance embedding "
                             "timestep_cond")
        if timestep_cond is not None:
            t_emb = t_emb + self.time_embedding.cond_proj(timestep_cond.to(x.dtype))
        emb = self.time_embed(t_emb)  # [B, 1280]
        if (y is None) != (not self.config.adm_in_channels):
            raise ValueError(f"this UNet takes {'a' if self.config.adm_in_channels else 'no'} vector conditioning y")
        if y is not None:
            emb = emb + self.label_emb(y.to(emb.dtype))
        skips = []
        h = x
        for block in self.input_blocks:  # [B, 320, 64, 64] ... [B, 1280, 8, 8]
            h = block(h, emb, context, context_mask=context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask=context_mask)  # [B, 1280, 8, 8]
        for block in self.output_blocks:  # [B, 1280, 8, 8] ... [B, 320, 64, 64]
            h = torch.cat([h, skips.pop()], dim=1)
            size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None  # where the next skip joins
            h = block(h, emb, context, upsample_size=size, context_mask=context_mask)
        return self.out(h)  # [B, 4, 64, 64]
