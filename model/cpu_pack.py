"""Weights pre-packed for oneDNN, so CPU convolutions and linear layers stop re-laying out weights on every call.

In eager mode PyTorch hands oneDNN plain weights, which it reorders into its blocked layout on each call (and fp32
linear layers go to MKL, slow on AMD CPUs): for the UNet's deep levels (4x4 or 8x8 feature maps, 1280 channels) the
reorder costs several times the arithmetic. ``prepack`` does it once at load time, as ``torch.compile``'s freezing
pass does, without compiling. Measured on SD 1.5 at 256x256 (2-core AMD EPYC): UNet step 2.3 s -> 1.1 s in fp32,
0.9 s -> 0.6 s in bf16. What each layer becomes:

- 3x3 convolutions: ``PackedConv2d``;
- 1x1 convolutions: ``PackedPointwiseConv``, the same matrix as a packed linear layer (a packed 1x1 convolution
  weight is fast only at the feature-map size it was packed for: measured 100x slower at 4x4 when packed for 32x32);
- ``Upsample`` (nearest 2x, then 3x3 conv): ``PackedUpsample``, a sub-pixel convolution doing 16 multiply-adds
  where the plain path does 36;
- linear layers: ``PackedLinear``.

Numbers stay those of the plain layers up to float summation order (below 1e-5 relative in fp32). The packed
modules drop their plain weights, so a packed network is for inference only, and its ``state_dict`` no longer
holds those weights: pack after loading and never save a packed network.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from model.layers import Upsample

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
EXAMPLE_ROWS = 2048  # steers the packed linear layout only; measured equally fast from 2 to 8192 rows


class PackedConv2d(nn.Module):
    """An ``nn.Conv2d`` (zero padding) whose weight is held in oneDNN's blocked layout."""

    def __init__(self, conv: nn.Conv2d, example_input: list[int]) -> None:
        super().__init__()
        self.stride, self.dilation = list(conv.stride), list(conv.dilation)
        self.padding: list[int] = list(conv.padding)  # type: ignore[arg-type]  # never a string: see _packable
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        weight = conv.weight.detach()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]  # stub lacks input_size
            weight.contiguous().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, example_input
        )
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, packed"


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, example_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), example_rows)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # oneDNN's linear takes 2-D input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PackedPointwiseConv(nn.Module):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding) run as a packed linear layer over the channels of each position.

    On channels_last input the rows are a view; on contiguous input they are one transposing copy, which measured
    cheaper than the plain convolution.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        matrix = conv.weight.detach().reshape(self.out_channels, self.in_channels).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(matrix, EXAMPLE_ROWS)
        self.bias = None if conv.bias is None else conv.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view for channels_last input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last strides

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), packed as linear"


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> [4 * O, C, 2, 2]: the 3x3 kernel as seen from the input of a nearest 2x upsampling.

    Output pixel (2i + a, 2j + b) of conv3x3(upsample(x)) reads x rows i - 1 + a .. i + a and columns
    j - 1 + b .. j + b only; kernel rows (columns) that land on the same input row (column) add up. Phases (a, b)
    are stacked phase-major: (0, 0), (0, 1), (1, 0), (1, 1).
    """
    w = weight.float()
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], dim=2),  # a = 0: rows i - 1, i
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], dim=2))  # a = 1: rows i, i + 1
    phases = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], dim=3) if b == 0 else
              torch.stack([r[..., 0] + r[..., 1], r[..., 2]], dim=3)
              for r in rows for b in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


class PackedUpsample(Upsample):
    """``Upsample`` as a sub-pixel convolution: the 3x3 conv of the 2x-upsampled map is computed on the map itself.

    One 2x2 convolution with 4x the output channels (one set per output phase) does 16 multiply-adds per output
    channel and input position where the plain path does 36, and the upsampled input is never materialised:
    measured 2.5x faster at the VAE's sizes. Sizes other than 2x (the UNet's odd skip sizes) take the plain path.
    """

    def __init__(self, upsample: Upsample) -> None:
        nn.Module.__init__(self)
        conv = upsample.conv
        self.conv = PackedConv2d(conv, [])  # type: ignore[assignment]  # plain path, for sizes other than 2x
        self.phases = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
            subpixel_weight(conv.weight.detach()).to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, []
        )
        self.phase_bias = None if conv.bias is None else conv.bias.detach().repeat(4).contiguous()

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if size is not None and size != (2 * H, 2 * W):
            return super().forward(x, size)
        x = x.contiguous(memory_format=torch.channels_last)
        # [B, 4C, H + 1, W + 1]: phase (a, b) of output pixel (2i + a, 2j + b) sits at (i + a, j + b)
        z = torch.ops.mkldnn._convolution_pointwise(
            x, self.phases, self.phase_bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
        z = z.permute(0, 2, 3, 1).reshape(B, H + 1, W + 1, 2, 2, C)  # channels_last: a view
        out = torch.empty(B, H, 2, W, 2, C, dtype=z.dtype, device=z.device)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = z[:, a : a + H, b : b + W, a, b]
        return out.view(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)  # [B, C, 2H, 2W], channels_last


def can_prepack(dtype: torch.dtype) -> bool:
    """True when this PyTorch build has the oneDNN ops and ``dtype`` is one they take."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:  # the ops are internal: check that they run, and agree with the plain layers, before relying on them
        conv = nn.Conv2d(8, 8, 3, padding=1).to(dtype)
        linear = nn.Linear(8, 8).to(dtype)
        x = torch.randn(1, 8, 4, 4, dtype=dtype)
        rows = torch.randn(3, 8, dtype=dtype)
        with torch.no_grad():
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            ok = torch.allclose(PackedConv2d(conv, list(x.shape))(x), conv(x), atol=tol, rtol=tol) and \
                torch.allclose(PackedLinear(linear, 3)(rows), linear(rows), atol=tol, rtol=tol)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.info("oneDNN weight pre-packing unavailable (%s); using plain layers", e)
        return False
    return ok


def _packable(conv: nn.Conv2d) -> bool:
    return (conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and conv.groups == 1
            and conv.weight.dtype in PACKABLE_DTYPES)


def _sizes(conv: nn.Conv2d) -> tuple[object, ...]:
    return conv.kernel_size, conv.stride, conv.padding


def _pointwise(conv: nn.Conv2d) -> bool:
    return _sizes(conv) == ((1, 1), (1, 1), (0, 0))


def prepack(module: nn.Module) -> int:
    """Replace ``module``'s convolutions, upsamplers and linear layers (in place) with pre-packed ones; returns how
    many. Layers of other dtypes, groups or padding modes stay as they are.

    No example input size is given to oneDNN: the layout it then picks measured as fast as a size-specific one for
    3x3 kernels at every UNet and VAE feature-map size, and linear layers run as fast at any number of rows.
    """
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is Upsample and _packable(child.conv) and _sizes(child.conv) == ((3, 3), (1, 1), (1, 1)):
            setattr(module, name, PackedUpsample(child))
            count += 1
        elif isinstance(child, nn.Conv2d) and _packable(child) and (_pointwise(child) or child.kernel_size != (1, 1)):
            setattr(module, name, PackedPointwiseConv(child) if _pointwise(child) else PackedConv2d(child, []))
            count += 1
        elif isinstance(child, nn.Linear) and child.weight.dtype in PACKABLE_DTYPES:
            setattr(module, name, PackedLinear(child, EXAMPLE_ROWS))
            count += 1
        else:
            count += prepack(child)
    return count

