"""Weights pre-packed for oneDNN, so CPU convolutions and linear layers stop re-laying out weights on every call.

In eager mode PyTorch hands oneDNN plain weights, which it reorders into its blocked layout on each call (and fp32
linear layers go to MKL): for the UNet's deep levels (4x4 or 8x8 feature maps, 1280 channels) the reorder costs
several times the arithmetic. Packing once, as ``torch.compile``'s freezing pass does, removes it, but only when the
weight is packed in the layout of the kernel oneDNN selects for the real input: that kernel differs between CPUs
(AVX-512, AMX, AVX2 brgemm) and between input shapes, so each layer packs on its first call, for that call's
input. Whether packing pays at all is then measured per layer kind (``model.cpu_choice``). What each layer becomes:

- 3x3 convolutions: ``PackedConv2d``; those with many channels in fp32 ``WinogradConv2d``, which may run them by
  Winograd's F(4x4, 3x3) or F(2x2, 3x3) (``model.winograd``: 4x or 2.25x less arithmetic) where that measures
  faster than the packed direct convolution;
- 1x1 convolutions: ``PackedPointwiseConv``, the same matrix as a packed linear layer;
- ``Upsample`` (nearest 2x, then 3x3 conv): ``PackedUpsample``, whose 2x path is a sub-pixel convolution doing 16
  multiply-adds where the plain path does 36 (``SubpixelConv``);
- linear layers: ``PackedLinear``.

Numbers stay those of the plain layers up to float summation order (below 1e-5 relative in fp32). A layer keeps
only the weights of the path it runs, so a packed network is for inference only, and its ``state_dict`` no longer
holds those weights: pack after loading and never save a packed network.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from model import host_memory, winograd
from model.cpu_choice import LayerPath, PathChooser, chosen_call
from model.layers import Upsample

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class ChosenLayer(nn.Module):
    """A layer with a packed and a plain path: packed when built without a chooser, else what the chooser picks.

    Weights are packed on the first packed call, for that call's input shape, so oneDNN lays them out for the
    kernel it selects for real inputs (packed for no shape, a 3x3 weight got a layout that the AVX2 kernel reorders
    again on every call). Once the path is fixed, only that path's weights are kept.
    """

    kind = ""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, chooser: PathChooser | None) -> None:
        super().__init__()
        self.weight: torch.Tensor | None = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed: torch.Tensor | None = None
        self.chooser = chooser
        self.path: LayerPath | None = LayerPath.PACKED if chooser is None else None
        self.measured = False

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            assert self.weight is not None
            self.packed = self.pack(self.weight, x)
            if self.path is LayerPath.PACKED:  # settled: the plain copy is no longer needed
                self.weight = None
        return self.packed

    def plain_weight(self) -> torch.Tensor:
        if self.weight is None:
            assert self.packed is not None
            self.weight = self.packed.to_dense()
        return self.weight

    def settle(self, path: LayerPath) -> None:
        self.path = path
        if path is LayerPath.PLAIN:
            self.plain_weight()
            self.packed = None
        elif self.packed is not None:
            self.weight = None

    def after_measuring(self) -> None:
        self.weight = None  # restored from the packed copy if plain wins: one copy held at a time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chosen_call(self, self.kind, tuple(x.shape), lambda: self.run_packed(x), lambda: self.run_plain(x))

    def path_repr(self) -> str:
        return "path undecided" if self.path is None else f"{self.path.value}"


class PackedConv2d(ChosenLayer):
    """An ``nn.Conv2d`` (zero padding) whose weight is held in oneDNN's blocked layout."""

    kind = "conv3x3"

    def __init__(self, conv: nn.Conv2d, chooser: PathChooser | None = None) -> None:
        super().__init__(conv.weight, conv.bias, chooser)
        self.stride, self.dilation = list(conv.stride), list(conv.dilation)
        self.padding: list[int] = list(conv.padding)  # type: ignore[arg-type]  # never a string: see _packable
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        if conv.kernel_size != (3, 3):
            self.kind = f"conv{conv.kernel_size[0]}x{conv.kernel_size[1]}"

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]  # stub lacks input_size
            weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(x.shape)
        )

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.plain_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, padding={self.padding}, " \
            f"{self.path_repr()}"


class WinogradConv2d(ChosenLayer):
    """A stride-1 3x3 fp32 convolution that may run by Winograd's minimal filtering (``model.winograd``).

    Its own kind of the self-check, ``winograd``, measured on the layers whose first input has a tile
    (``winograd.tile_for``): "packed" is the Winograd path (its weight transformed once, 16/9 or 4x the size of the
    plain one), "plain" the direct convolution ``direct`` (a ``PackedConv2d``, measured packed, then on the
    ``conv3x3`` kind's path). Layers whose first input has no tile (4x4 maps, say), or that would leave too little
    memory free for the transformed weight (``host_memory.room_for``), run ``direct`` only. Once Winograd is
    settled, ``direct``'s weights are dropped.
    """

    kind = "winograd"

    def __init__(self, conv: PackedConv2d, chooser: PathChooser | None = None) -> None:
        assert conv.weight is not None
        super().__init__(conv.weight, conv.bias, chooser)  # the same tensors as ``direct``'s: no copy
        self.direct = conv
        self.tile: int | None = None  # Winograd's output tile, 0 for direct: from the first input

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return winograd.transform_weight(weight, self.tile or 4)

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        return winograd.conv3x3(x, self.packed_weight(x), self.bias)

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.direct.run_packed(x) if self.path is None else self.direct(x)

    def settle(self, path: LayerPath) -> None:
        self.path = path
        if path is LayerPath.PLAIN:  # ``direct`` holds what it needs
            self.packed = self.weight = None
        else:
            self.direct.weight = self.direct.packed = None
            if self.packed is not None:
                self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is None:
            tile = winograd.tile_for(self.direct.in_channels, self.direct.out_channels, x.shape[-2], x.shape[-1])
            if self.path is LayerPath.PACKED:  # built without a chooser: Winograd at any size
                tile = tile or 2
            assert self.weight is not None
            if tile and not host_memory.room_for(self.weight.nbytes * (tile + 2) ** 2 // 9):
                log.warning("%d->%d channel 3x3 convolution: too little free memory for Winograd's transformed "
                            "weight; it runs direct", self.direct.in_channels, self.direct.out_channels)
                tile = 0
            self.tile = tile
            if not tile:
                self.weight = None  # ``direct`` keeps its own reference
            elif self.path is LayerPath.PACKED:
                self.direct.weight = None
        return super().forward(x) if self.tile else self.direct(x)

    def extra_repr(self) -> str:
        how = "tile from the first input" if self.tile is None else f"F({self.tile}x{self.tile}, 3x3)" if self.tile \
            else "direct only"
        return f"Winograd or direct, {how}, {self.path_repr()}"


class PackedLinear(ChosenLayer):
    """An ``nn.Linear`` whose weight is held in oneDNN's blocked layout."""

    kind = "linear"

    def __init__(self, linear: nn.Linear, chooser: PathChooser | None = None) -> None:
        super().__init__(linear.weight, linear.bias, chooser)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // self.in_features)

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # oneDNN's linear takes 2-D input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight(rows), self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.plain_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.path_repr()}"


class PackedPointwiseConv(ChosenLayer):
    """A 1x1 ``nn.Conv2d`` (stride 1, no padding) run as a packed linear layer over the channels of each position.

    On channels_last input the rows are a view; on contiguous input they are one transposing copy, which measured
    cheaper than the plain convolution. (A 1x1 convolution weight packed as a convolution is fast only at the
    feature-map size it was packed for: measured 100x slower at 4x4 when packed for 32x32.)
    """

    kind = "conv1x1"

    def __init__(self, conv: nn.Conv2d, chooser: PathChooser | None = None) -> None:
        super().__init__(conv.weight.reshape(conv.out_channels, conv.in_channels), conv.bias, chooser)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // self.in_channels)

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view for channels_last input
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight(rows), self.bias, "none", [], "")
        return out.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last strides

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.plain_weight()[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1, 1), as linear, {self.path_repr()}"


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


class SubpixelConv(ChosenLayer):
    """Nearest 2x upsampling then a 3x3 convolution, computed as one 2x2 convolution of the map itself.

    One 2x2 convolution with 4x the output channels (one set per output phase) does 16 multiply-adds per output
    channel and input position where the plain path does 36, and the upsampled input is never materialised:
    measured 2.5x faster at the VAE's sizes. The plain path is the upsampling and ``conv``'s plain convolution.
    """

    kind = "upsample"

    def __init__(self, conv: PackedConv2d, chooser: PathChooser | None = None) -> None:
        assert conv.weight is not None
        super().__init__(subpixel_weight(conv.weight), None if conv.bias is None else conv.bias.repeat(4), chooser)
        self.conv = [conv]  # in a list: the plain path's convolution, owned (and registered) by the Upsample

    def pack(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
            weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape)
        )

    def run_packed(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.contiguous(memory_format=torch.channels_last)
        # [B, 4C, H + 1, W + 1]: phase (a, b) of output pixel (2i + a, 2j + b) sits at (i + a, j + b)
        z = torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight(x), self.bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""
        )
        z = z.permute(0, 2, 3, 1).reshape(B, H + 1, W + 1, 2, 2, C)  # channels_last: a view
        out = torch.empty(B, H, 2, W, 2, C, dtype=z.dtype, device=z.device)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = z[:, a : a + H, b : b + W, a, b]
        return out.view(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)  # [B, C, 2H, 2W], channels_last

    def run_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv[0].run_plain(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def settle(self, path: LayerPath) -> None:
        self.path = path
        if path is LayerPath.PLAIN:  # the sub-pixel weight is needed only to pack it
            self.packed = self.weight = None
        elif self.packed is not None:
            self.weight = None

    def extra_repr(self) -> str:
        return f"sub-pixel 2x2, {self.path_repr()}"


class PackedUpsample(Upsample):
    """``Upsample`` with a sub-pixel path for 2x (``SubpixelConv``); other sizes (the UNet's odd skip sizes) take
    the upsampling and ``conv``."""

    def __init__(self, upsample: Upsample, chooser: PathChooser | None = None) -> None:
        nn.Module.__init__(self)
        conv = PackedConv2d(upsample.conv, chooser)
        self.conv = conv  # type: ignore[assignment]
        self.subpixel = SubpixelConv(conv, chooser)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is not None and size != (2 * x.shape[-2], 2 * x.shape[-1]):
            return super().forward(x, size)
        return self.subpixel(x)


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
            ok = torch.allclose(PackedConv2d(conv)(x), conv(x), atol=tol, rtol=tol) and \
                torch.allclose(PackedLinear(linear)(rows), linear(rows), atol=tol, rtol=tol)
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


def _winograd(conv: nn.Conv2d) -> bool:
    return (_sizes(conv) == ((3, 3), (1, 1), (1, 1)) and conv.dilation == (1, 1) and conv.weight.dtype == torch.float32
            and min(conv.in_channels, conv.out_channels) >= winograd.MIN_CHANNELS)


def prepack(module: nn.Module, chooser: PathChooser | None = None) -> int:
    """Replace ``module``'s convolutions, upsamplers and linear layers (in place) with packable ones; returns how
    many. Layers of other dtypes, groups or padding modes stay as they are.

    With a ``chooser`` each layer kind runs packed or plain as the first pass measures (``model.cpu_choice``);
    without one, every replaced layer runs packed.
    """
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is Upsample and _packable(child.conv) and _sizes(child.conv) == ((3, 3), (1, 1), (1, 1)):
            setattr(module, name, PackedUpsample(child, chooser))
            count += 1
        elif isinstance(child, nn.Conv2d) and _packable(child) and (_pointwise(child) or child.kernel_size != (1, 1)):
            setattr(module, name, PackedPointwiseConv(child, chooser) if _pointwise(child)
                    else WinogradConv2d(PackedConv2d(child, chooser), chooser) if _winograd(child)
                    else PackedConv2d(child, chooser))
            count += 1
        elif isinstance(child, nn.Linear) and child.weight.dtype in PACKABLE_DTYPES:
            setattr(module, name, PackedLinear(child, chooser))
            count += 1
        else:
            count += prepack(child, chooser)
    return count
