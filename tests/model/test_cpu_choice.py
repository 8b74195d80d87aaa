"""The CPU self-check: each layer kind runs packed or plain, whichever its first pass measured faster."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from model.cpu_choice import LayerPath, PathChooser, faster
from model.cpu_pack import ChosenLayer, can_prepack, prepack
from model.weights import load_components

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN ops")


def layers(module: nn.Module) -> list[ChosenLayer]:
    return [m for m in module.modules() if isinstance(m, ChosenLayer)]


def test_fake_timings_pick_the_faster_path_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    chooser = PathChooser("UNet")
    for packed_s, plain_s in ((0.010, 0.030), (0.020, 0.015)):  # packed wins on the sum: 30 ms vs 45 ms
        chooser.record("conv3x3", packed_s, plain_s)
    chooser.record("linear", 0.004, 0.002)
    with caplog.at_level(logging.INFO, logger="model.cpu_choice"):
        assert chooser.decide("conv3x3") is LayerPath.PACKED
        assert chooser.decide("linear") is LayerPath.PLAIN
        chooser.record("linear", 0.0, 1.0)  # decided once: later timings change nothing
        assert chooser.decide("linear") is LayerPath.PLAIN
    assert "UNet conv3x3 layers: packed (measured on 2 layers: packed 30.0 ms, plain 45.0 ms" in caplog.text
    assert caplog.text.count("UNet linear layers: plain") == 1
    assert faster(1.0, 1.0) is LayerPath.PLAIN  # a tie keeps plain PyTorch


def test_the_chooser_picks_a_path_on_this_machine_and_logs_it(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = load_components(tiny_checkpoint)
    unet, vae = copy.deepcopy(c.unet), copy.deepcopy(c.vae)
    chooser, vae_chooser = PathChooser("UNet", budget_s=1e9), PathChooser("VAE", budget_s=1e9)  # the whole pass
    assert prepack(unet, chooser) > 20 and prepack(vae, vae_chooser) > 20
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.full((2,), 321)
    z = torch.randn(1, 4, 8, 8)
    with caplog.at_level(logging.INFO, logger="model.cpu_choice"), torch.inference_mode():
        for _ in range(2):  # the first pass measures both paths, the second runs the chosen one
            assert torch.allclose(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
            assert torch.allclose(vae.decode(z), c.vae.decode(z), atol=1e-4, rtol=1e-4)
    assert set(chooser.decided) == {"conv3x3", "conv1x1", "linear", "upsample"}
    assert set(vae_chooser.decided) == {"conv3x3", "conv1x1", "upsample"}  # the tiny VAE has no linear layer
    for kind, path in chooser.decided.items():
        assert f"UNet {kind} layers: {path.value}" in caplog.text
    for layer in layers(unet) + layers(vae.decoder):
        if layer.measured:  # the encoder's layers never ran
            assert layer.path is chooser.decided.get(layer.kind) or layer.path is vae_chooser.decided[layer.kind]
            # one copy of the weights is kept: the packed one or the plain one
            assert (layer.packed is None) != (layer.weight is None) or layer.kind == "upsample"


@pytest.mark.parametrize("path", [LayerPath.PACKED, LayerPath.PLAIN])
def test_packed_and_plain_paths_give_the_plain_networks_numbers(tiny_checkpoint: Path, path: LayerPath) -> None:
    c = load_components(tiny_checkpoint)
    unet, text = copy.deepcopy(c.unet), copy.deepcopy(c.text_encoder)
    chooser = PathChooser("test")
    chooser.decided = dict.fromkeys(("conv3x3", "conv1x1", "linear", "upsample"), path)  # as if measured
    prepack(unet, chooser)
    prepack(text, chooser)
    with torch.inference_mode():
        for batch, h, w in ((1, 8, 8), (3, 9, 11)):  # 9x11: the UNet upsamples 5x6 to 9x11, not by 2x
            x, ctx, t = torch.randn(batch, 4, h, w), torch.randn(batch, 77, 32), torch.full((batch,), 321)
            assert torch.allclose(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
        ids = torch.randint(0, 49407, (2, 77))
        ours, plain = text(input_ids=ids).last_hidden_state, c.text_encoder(input_ids=ids).last_hidden_state
        assert torch.allclose(ours, plain, atol=1e-4, rtol=1e-4)
    assert {layer.path for layer in layers(unet) + layers(text) if layer.path is not None} == {path}


def test_a_kind_is_decided_once_its_measuring_budget_is_spent(tiny_checkpoint: Path) -> None:
    c = load_components(tiny_checkpoint)
    unet = copy.deepcopy(c.unet)
    chooser = PathChooser("UNet", budget_s=0.0)  # decided by the first layer of each kind measured
    prepack(unet, chooser)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.full((2,), 321)
    with torch.inference_mode():
        assert torch.allclose(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)  # one pass decides all
    assert set(chooser.decided) == {"conv3x3", "conv1x1", "linear", "upsample"}
    assert {kind: t.layers for kind, t in chooser.totals.items()} == dict.fromkeys(chooser.decided, 1)
    assert sum(layer.measured for layer in layers(unet)) == 4
