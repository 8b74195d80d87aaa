"""Winograd 3x3 convolutions give the direct convolution's numbers, and the self-check decides where they run."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import host_memory, winograd
from model.cpu_choice import LayerPath, PathChooser
from model.cpu_pack import PackedConv2d, WinogradConv2d, can_prepack, prepack
from model.weights import load_components


def direct(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", [(2, 16, 12, 12), (1, 5, 7, 9), (3, 4, 1, 1), (1, 8, 6, 5), (2, 24, 17, 16)])
def test_winograd_equals_the_direct_convolution(tile: int, shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(tile)
    x = torch.randn(*shape)
    w, b = torch.randn(11, shape[1], 3, 3) / (3 * shape[1] ** 0.5), torch.randn(11)
    u = winograd.transform_weight(w, tile)
    assert u.shape == ((tile + 2) ** 2, 11, shape[1])
    reference = direct(x, w, b)
    scale = reference.abs().max().item()
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        out = winograd.conv3x3(layout, u, b)
        assert out.shape == reference.shape and out.dtype == torch.float32
        assert (out.double() - reference).abs().max().item() < 2e-5 * scale * tile
    without_bias = winograd.conv3x3(x, u, None).double()
    assert (without_bias - direct(x, w, None)).abs().max().item() < 2e-5 * scale * tile


def test_a_wrong_transform_is_caught() -> None:
    """The checks above can fail: a transform with one sign flipped gives other numbers."""
    torch.manual_seed(3)
    x, w = torch.randn(1, 6, 8, 8), torch.randn(5, 6, 3, 3)
    u = winograd.transform_weight(w, 4)
    u[7] = -u[7]
    assert (winograd.conv3x3(x, u, None).double() - direct(x, w, None)).abs().max().item() > 1e-2


def test_the_tile_follows_channels_and_map_size() -> None:
    few, wide = winograd.MIN_CHANNELS, 2 * winograd.WIDE
    assert winograd.tile_for(few, few, 64, 64) == 4 and winograd.tile_for(few, winograd.WIDE, 16, 40) == 4
    assert winograd.tile_for(wide, wide, 32, 32) == 4 and winograd.tile_for(wide, few, 16, 16) == 2  # 4x weight
    assert winograd.tile_for(few, few, 8, 8) == 2 and winograd.tile_for(few, few, 15, 64) == 2
    assert winograd.tile_for(few, few, 4, 4) == 0 and winograd.tile_for(few - 1, few, 64, 64) == 0


pack_only = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN ops")


@pack_only
def test_prepack_wraps_fp32_3x3_convolutions_with_many_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2,
                        padding=1), nn.Conv2d(8, 8, 3, padding=1).bfloat16())
    assert prepack(net) == 4
    assert isinstance(net[0], WinogradConv2d)
    assert type(net[1]) is PackedConv2d and type(net[2]) is PackedConv2d  # 4 channels; stride 2
    assert type(net[3]) is PackedConv2d  # bf16 keeps the direct kernels


@pack_only
def test_the_self_check_measures_winograd_and_keeps_the_winning_weights(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)  # the tiny UNet's channels: 32 and 64
    monkeypatch.setattr(winograd, "WIDE", 64)
    c = load_components(tiny_checkpoint)
    unet = copy.deepcopy(c.unet)
    chooser = PathChooser("UNet", budget_s=1e9)
    prepack(unet, chooser)
    wrapped = [m for m in unet.modules() if isinstance(m, WinogradConv2d)]
    assert len(wrapped) > 4
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.full((2,), 321)
    with caplog.at_level(logging.INFO, logger="model.cpu_choice"), torch.inference_mode():
        for _ in range(2):
            assert torch.allclose(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
    path = chooser.decided["winograd"]
    assert f"UNet winograd layers: {path.value} (measured on" in caplog.text
    tiles = {m.tile for m in wrapped}
    assert tiles == {4, 2}  # 16x16 maps at the first level, 8x8 at the second
    for layer in wrapped:
        assert layer.path is path
        if path is LayerPath.PACKED:  # the transformed weight only
            assert layer.packed is not None and layer.weight is None and layer.direct.weight is None
        else:  # the direct convolution's weight only
            assert layer.packed is None and (layer.direct.weight is not None or layer.direct.packed is not None)


@pack_only
@pytest.mark.parametrize("path", [LayerPath.PACKED, LayerPath.PLAIN])
def test_either_winograd_path_gives_the_plain_numbers(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, path: LayerPath
) -> None:
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    c = load_components(tiny_checkpoint)
    vae = copy.deepcopy(c.vae)
    chooser = PathChooser("VAE")
    chooser.decided["winograd"] = path  # as a stored choice would set it
    prepack(vae, chooser)
    z = torch.randn(1, 4, 9, 12)  # odd sides: padded tiles, then cropped
    with torch.inference_mode():
        for _ in range(2):
            assert torch.allclose(vae.decode(z), c.vae.decode(z), atol=1e-4, rtol=1e-4)
    used = [m for m in vae.decoder.modules() if isinstance(m, WinogradConv2d) and m.tile]
    assert used and all(m.path is path for m in used)


@pack_only
def test_too_little_free_memory_keeps_the_direct_convolution(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)
    monkeypatch.setattr(host_memory, "available_bytes", lambda *a: (2 << 30, 8 << 30))  # 2 of 8 GiB free
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16)
    roomy, tight = WinogradConv2d(PackedConv2d(conv)), WinogradConv2d(PackedConv2d(conv))
    with torch.inference_mode():
        assert torch.allclose(roomy(x), conv(x), atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(host_memory, "available_bytes", lambda *a: ((1 << 30) + 100, 8 << 30))
        with caplog.at_level(logging.WARNING, logger="model.cpu_pack"):
            assert torch.allclose(tight(x), conv(x), atol=1e-5, rtol=1e-5)
    assert roomy.tile == 4 and roomy.packed is not None
    assert tight.tile == 0 and tight.packed is None and "too little free memory" in caplog.text


def test_free_memory_is_capped_by_the_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:   8000000 kB\n")
    assert host_memory.available_bytes(meminfo, tmp_path / "none") == (8_192_000_000, 16_384_000_000)
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert host_memory.available_bytes(meminfo, tmp_path) == (3 << 30, 4 << 30)
    assert host_memory.room_for(2 << 30, meminfo, tmp_path)  # 1 GiB left: the reserve
    assert not host_memory.room_for((2 << 30) + 1, meminfo, tmp_path)
    (tmp_path / "memory.max").write_text("max\n")
    assert host_memory.available_bytes(meminfo, tmp_path) == (8_192_000_000, 16_384_000_000)
    assert host_memory.available_bytes(tmp_path / "missing") is None and host_memory.room_for(1 << 60, tmp_path)


@pack_only
def test_a_pipeline_on_winograd_draws_the_plain_pixels(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from model.pipeline import Pipeline
    from model.requests import GenerationRequest

    request = GenerationRequest(prompt="a red cube", width=128, height=128, steps=3, seed=7)
    plain = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32", cpu_choices=None)
    expected = np.asarray(plain.generate([request])[0].images[0], dtype=np.int16)  # type: ignore[union-attr]
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 32)
    monkeypatch.setattr(winograd, "WIDE", 32)
    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32", cpu_choices=None)
    for chooser in pipe.cpu_choosers:
        chooser.decided["winograd"] = LayerPath.PACKED
    for _ in range(2):
        image = np.asarray(pipe.generate([request])[0].images[0], dtype=np.int16)  # type: ignore[union-attr]
        assert np.abs(image - expected).max() <= 1
    used = [m for net in (pipe.components.unet, pipe.components.vae) for m in net.modules()
            if isinstance(m, WinogradConv2d) and m.tile]
    assert {m.tile for m in used} == {2, 4} and all(m.path is LayerPath.PACKED for m in used)
