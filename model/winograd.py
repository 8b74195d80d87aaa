"""3x3 convolutions by Winograd's minimal filtering: F(2x2, 3x3) does 16 multiplications per 2x2 output tile and
F(4x4, 3x3) 36 per 4x4 tile, where the direct convolution does 36 and 144: 2.25x and 4x less arithmetic in the
matrix products, for extra additions.

Each m x m output tile of a stride-1, padding-1 3x3 convolution is read off an (m + 2) x (m + 2) input tile ``d``:
``y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015),
with ``*`` the element-wise product over the (m + 2)^2 tile positions. Summed over the input channels that product
is, for each position k, one matrix product ``U[k] @ V[k]`` of the transformed weight (out x in channels) and the
transformed input tiles (in channels x tiles): a batch of large products instead of one convolution, plus the input
and output transforms, sums with small integer factors, one pass each over the tiles. In float32 the result
differs from the direct convolution by about 1e-6 (F(2x2)) and 1e-5 (F(4x4)) of the output's scale.

On a 2-core AMD EPYC Zen 3 (AVX2) F(4x4) ran the SD 1.5 UNet's 3x3 convolutions 1.6-2.4x faster than oneDNN's
pre-packed direct kernels on 16x16 to 64x64 maps with 320-960 channels, and the VAE's 512-channel ones 1.96x;
F(2x2) 1.4-2.7x on the UNet's 1280-channel 8x8 and 16x16 maps (where F(4x4) leaves few tiles per weight); both
lose at 4x4 and with few channels over large maps, where the transforms' memory traffic outweighs the arithmetic
saved (``tile_for``). The transformed weight takes 16/9 (F(2x2)) or 4x (F(4x4)) the memory of the plain one.
Whether Winograd pays on a given CPU is measured by the self-check (``model.cpu_pack.WinogradConv2d``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MIN_CHANNELS = 320  # fewer input or output channels: the transforms cost more than the products save
WIDE = 640  # more channels than this: F(4x4)'s 4x weight only on maps of 32x32 and up (enough tiles to reuse it)

_G = {
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
}

Out = Sequence[torch.Tensor] | None
Transform = Callable[[Sequence[torch.Tensor], Out], list[torch.Tensor]]


def tile_for(in_channels: int, out_channels: int, height: int, width: int) -> int:
    """The output tile Winograd runs this convolution with, or 0 where direct is faster (see above): F(4x4) on maps
    of 32x32 and up, or 16x16 and up for weights of at most ``WIDE`` channels; F(2x2) on other maps of 8x8 and up.

    F(4x4)'s transformed weight is 4x the plain one, F(2x2)'s 16/9: on a 16x16 map the UNet's 1280-channel
    layers ran only about 1.2x faster with F(4x4) than with F(2x2), for 2.25x the memory (about 1.3 GB more)."""
    side = min(height, width)
    if min(in_channels, out_channels) < MIN_CHANNELS or side < 8:
        return 0
    return 4 if side >= 32 or (side >= 16 and max(in_channels, out_channels) <= WIDE) else 2


def transform_weight(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """[O, C, 3, 3] -> U, [(tile + 2)^2, O, C]: ``G g G^T`` for each (out, in) channel pair, tile position major."""
    g = torch.tensor(_G[tile], dtype=torch.float64)
    both = torch.kron(g, g).to(weight.dtype)  # [(tile + 2)^2, 9]: G (.) G^T as one matrix on the 9 taps
    out_c, in_c = weight.shape[:2]
    u = both @ weight.reshape(out_c * in_c, 9).T  # one product: milliseconds where a float64 einsum took seconds
    return u.view(-1, out_c, in_c)


def _into(out: Out, k: int, value: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    return value(None if out is None else out[k])


def _bt2(d: Sequence[torch.Tensor], out: Out = None) -> list[torch.Tensor]:
    """B^T of F(2x2, 3x3) along one axis: 4 points -> 4."""
    return [_into(out, 0, lambda o: torch.sub(d[0], d[2], out=o)),
            _into(out, 1, lambda o: torch.add(d[1], d[2], out=o)),
            _into(out, 2, lambda o: torch.sub(d[2], d[1], out=o)),
            _into(out, 3, lambda o: torch.sub(d[1], d[3], out=o))]


def _at2(m: Sequence[torch.Tensor], out: Out = None) -> list[torch.Tensor]:
    """A^T of F(2x2, 3x3) along one axis: 4 points -> 2 outputs."""
    return [_into(out, 0, lambda o: torch.add(m[0], m[1], out=o).add_(m[2])),
            _into(out, 1, lambda o: torch.sub(m[1], m[2], out=o).sub_(m[3]))]


def _bt4(d: Sequence[torch.Tensor], out: Out = None) -> list[torch.Tensor]:
    """B^T of F(4x4, 3x3) along one axis: 6 points -> 6, with shared partial sums."""
    a, b = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)
    c, e = torch.sub(d[4], d[2]), torch.sub(d[3], d[1])
    return [_into(out, 0, lambda o: torch.add(d[4], d[2], alpha=-5, out=o).add_(d[0], alpha=4)),
            _into(out, 1, lambda o: torch.add(a, b, out=o)), _into(out, 2, lambda o: torch.sub(a, b, out=o)),
            _into(out, 3, lambda o: torch.add(c, e, alpha=2, out=o)),
            _into(out, 4, lambda o: torch.add(c, e, alpha=-2, out=o)),
            _into(out, 5, lambda o: torch.add(d[5], d[3], alpha=-5, out=o).add_(d[1], alpha=4))]


def _at4(m: Sequence[torch.Tensor], out: Out = None) -> list[torch.Tensor]:
    """A^T of F(4x4, 3x3) along one axis: 6 points -> 4 outputs."""
    p, q, r, s = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    return [_into(out, 0, lambda o: torch.add(m[0], p, out=o).add_(r)),
            _into(out, 1, lambda o: torch.add(q, s, alpha=2, out=o)),
            _into(out, 2, lambda o: torch.add(p, r, alpha=4, out=o)),
            _into(out, 3, lambda o: torch.add(q, s, alpha=8, out=o).add_(m[5]))]


_TRANSFORMS: dict[int, tuple[Transform, Transform]] = {2: (_bt2, _at2), 4: (_bt4, _at4)}


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``u = transform_weight(weight, tile)`` (the tile read off
    ``u``'s shape); any input size (sides that are no multiple of the tile are computed padded, then cropped).
    Returns a [N, O, H, W] tensor: contiguous, or a view of one when cropped."""
    N, C, H, W = x.shape
    points = round(u.shape[0] ** 0.5)
    tile, out_c = points - 2, u.shape[1]
    bt, at = _TRANSFORMS[tile]
    rows, cols = -(-H // tile), -(-W // tile)
    xp = F.pad(x, (1, 1 + tile * cols - W, 1, 1 + tile * rows - H))
    # B^T d B: the input rows of each tile row combined, then the columns, written straight into v.
    combined = bt([xp[:, :, k : k + tile * rows : tile] for k in range(points)], None)
    v = torch.empty(points * points, C, N, rows, cols, dtype=x.dtype, device=x.device)
    for i, part in enumerate(combined):
        bt([part[..., k : k + tile * cols : tile] for k in range(points)],
           list(v[points * i : points * (i + 1)].transpose(1, 2)))
    m = torch.bmm(u, v.view(points * points, C, N * rows * cols)).view(points, points, out_c, N, rows, cols)
    # A^T m A: over the tile's rows for each tile column j, then over the columns, into the output pixels.
    s = [at([m[i, j] for i in range(points)], None) for j in range(points)]
    y = torch.empty(N, out_c, rows, tile, cols, tile, dtype=x.dtype, device=x.device)
    for a in range(tile):
        at([s[j][a] for j in range(points)], [y[:, :, :, a, :, b].transpose(0, 1) for b in range(tile)])
    out = y.view(N, out_c, tile * rows, tile * cols)
    if bias is not None:
        out.add_(bias.view(1, out_c, 1, 1))
    return out[:, :, :H, :W] if (tile * rows, tile * cols) != (H, W) else out
