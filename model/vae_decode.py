"""Decoding latents at any batch and image size: in slices of images, and big images in overlapping tiles.

The VAE decoder's activations grow with batch x pixels (a 512x512 image holds ~1.2 GB of fp16 activations at its
largest level), so a batch goes through the decoder a few images at a time (``slice_rows``), and an image above
``TILE_ABOVE_PIXELS`` goes through it in tiles of ``TILE_SIDE`` pixels that overlap by a quarter, each seam
blended linearly (diffusers' ``AutoencoderKL.enable_vae_tiling``, same tiles, same blend). Slicing changes nothing
in the pixels; tiling does a little (each tile normalises its own features), so only images too big to decode
whole are tiled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # unscaled latents [B, 4, h, w] -> image [B, 3, 8h, 8w]

SLICE_PIXELS = 4 * 512 * 512  # image pixels per decoder call: 4 images at 512x512, 1 at 1024x1024
TILE_ABOVE_PIXELS = 1024 * 1024  # images bigger than this decode in tiles
TILE_SIDE = 512  # image pixels per tile side, as diffusers' tiling for SD 1.x (its VAE's sample_size)
TILE_OVERLAP = 0.25  # share of a tile that overlaps its neighbour


def slice_rows(height: int, width: int) -> int:
    """Images of ``height`` x ``width`` pixels per decoder call (at least 1)."""
    return max(1, SLICE_PIXELS // (height * width))


def decode_latents(decode: DecodeFn, z: torch.Tensor, latent_scale: int = 8) -> torch.Tensor:
    """Decode ``z`` [B, 4, h, w] through ``decode``, in slices of images, each image tiled when it is big."""
    height, width = z.shape[-2] * latent_scale, z.shape[-1] * latent_scale
    if height * width > TILE_ABOVE_PIXELS:
        return tiled_decode(decode, z, TILE_SIDE // latent_scale, latent_scale)
    return sliced_decode(decode, z, slice_rows(height, width))


def sliced_decode(decode: DecodeFn, z: torch.Tensor, rows: int) -> torch.Tensor:
    """``decode(z)``, ``rows`` images per call. Each image's pixels are those of the whole batch's call: the decoder
    has no batch-wide operation."""
    if z.shape[0] <= rows:
        return decode(z)
    return torch.cat([decode(z[start : start + rows]) for start in range(0, z.shape[0], rows)])


def tiled_decode(
    decode: DecodeFn, z: torch.Tensor, tile: int, latent_scale: int = 8, overlap: float = TILE_OVERLAP
) -> torch.Tensor:
    """Decode ``z`` in latent tiles of ``tile`` x ``tile`` that start every ``tile * (1 - overlap)`` latent pixels;
    each decoded tile is blended into the ones above and to its left over ``tile * latent_scale * overlap`` pixels
    and cropped to the stride. The tiles, the blend and the crop are diffusers' ``AutoencoderKL.tiled_decode``."""
    if z.shape[-2] <= tile and z.shape[-1] <= tile:
        return decode(z)
    stride = int(tile * (1 - overlap))
    sample_tile = tile * latent_scale
    blend = int(sample_tile * overlap)
    keep = sample_tile - blend  # pixels of each tile that end up in the image
    rows = [
        [decode(z[:, :, i : i + tile, j : j + tile]) for j in range(0, z.shape[-1], stride)]
        for i in range(0, z.shape[-2], stride)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        for j, decoded in enumerate(row):
            # in place, in this order, as diffusers: a tile's blended edges are what its later neighbours blend with
            if i > 0:
                _blend(rows[i - 1][j], decoded, blend, dim=2)
            if j > 0:
                _blend(row[j - 1], decoded, blend, dim=3)
        out_rows.append(torch.cat([decoded[:, :, :keep, :keep] for decoded in row], dim=3))
    return torch.cat(out_rows, dim=2)


def _blend(before: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Fade ``tile``'s first ``extent`` rows (dim 2) or columns (dim 3) in from ``before``'s last ones, in place."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    # the weights diffusers computes per row (y / extent, in double), then rounded to the tile's dtype
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w = ramp.to(tile.dtype).to(tile.device).view(shape)
    w_before = (1 - ramp).to(tile.dtype).to(tile.device).view(shape)
    head = tile.narrow(dim, 0, extent)
    tail = before.narrow(dim, before.shape[dim] - extent, extent)
    head.copy_(tail * w_before + head * w)
