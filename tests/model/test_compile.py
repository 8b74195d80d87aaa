"""SDQ_COMPILE: the UNet and the VAE decoder compile as whole graphs, and the compiled UNet predicts eager's ε."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from core.settings import SettingsError, load_settings
from model.compile import CompiledNetwork, compile_network
from model.unet import UNetModel
from model.vae import AutoencoderKL
from model.weights import tiny_configs


@pytest.fixture(scope="module")
def networks() -> tuple[UNetModel, AutoencoderKL]:
    unet_config, vae_config, _ = tiny_configs()
    torch.manual_seed(0)
    return UNetModel(unet_config).eval(), AutoencoderKL(vae_config).eval()


def unet_inputs(rows: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.tensor([981.0, 21.5])[:rows]  # a fractional timestep too (Karras sigmas)
    return x, t, torch.randn(rows, 77, 32, generator=g)


def test_unet_has_no_graph_breaks(networks: tuple[UNetModel, AutoencoderKL]) -> None:
    unet, _ = networks
    with torch.inference_mode():
        explained = torch._dynamo.explain(unet)(*unet_inputs())
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_unet_with_a_context_mask_has_no_graph_breaks(networks: tuple[UNetModel, AutoencoderKL]) -> None:
    """Rows whose prompts have fewer 77-token chunks than their batch mates attend to their own positions only."""
    unet, _ = networks
    x, t, _ = unet_inputs()
    context = torch.randn(2, 154, 32)
    mask = torch.ones(2, 154, dtype=torch.bool)
    mask[1, 77:] = False
    with torch.inference_mode():
        explained = torch._dynamo.explain(unet)(x, t, context, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_lcm_distilled_unet_has_no_graph_breaks() -> None:
    """An LCM-distilled UNet takes the guidance embedding as timestep_cond."""
    unet_config, _, _ = tiny_configs()
    torch.manual_seed(0)
    unet = UNetModel(dataclasses.replace(unet_config, time_cond_proj_dim=16)).eval()
    x, t, context = unet_inputs()
    with torch.inference_mode():
        explained = torch._dynamo.explain(unet)(x, t, context, None, None, torch.randn(2, 16))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_vae_decoder_has_no_graph_breaks(networks: tuple[UNetModel, AutoencoderKL]) -> None:
    _, vae = networks
    with torch.inference_mode():
        explained = torch._dynamo.explain(vae.decoder)(torch.randn(1, 4, 8, 8))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_unet_gives_eager_eps(networks: tuple[UNetModel, AutoencoderKL]) -> None:
    unet, _ = networks
    compiled = compile_network(unet, "default", torch.device("cpu"))
    assert isinstance(compiled, CompiledNetwork)
    inputs = unet_inputs()
    with torch.inference_mode():
        eager = unet(*inputs)
        fast = compiled(*inputs)
    # fp32; inductor fuses and reorders sums, so equal up to rounding, not bit for bit
    assert fast.shape == eager.shape
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_off_is_the_module_itself(networks: tuple[UNetModel, AutoencoderKL]) -> None:
    unet, _ = networks
    assert compile_network(unet, "off", torch.device("cpu")) is unet


def test_compile_setting_names_its_values() -> None:
    assert load_settings().compile == "off"
    with pytest.raises(SettingsError, match="SDQ_COMPILE"):
        load_settings(compile="fast")


def test_pipeline_runs_the_compiled_networks(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_compile puts the compiled UNet in batches without LoRAs and the compiled decoder in every full decode."""
    from model import compile as compile_module
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest

    calls: dict[str, int] = {}

    def counting(module: torch.nn.Module, mode: str, device: torch.device) -> Callable[..., torch.Tensor]:
        def run(*args: torch.Tensor) -> torch.Tensor:
            calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1
            return module(*args)
        return run

    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    request = GenerationRequest(prompt="a cat", width=64, height=64, steps=2, seed=3)
    # the first batch runs the CPU self-check (model/cpu_choice.py), whose measured layers give their packed output
    # whatever path timing then chooses: compare the runs after it
    pipe.generate([request])
    [eager] = pipe.generate([request])
    monkeypatch.setattr(compile_module, "compile_network", counting)
    monkeypatch.setattr("model.pipeline.compile_network", counting)
    pipe.use_compile("default")
    [compiled] = pipe.generate([request])
    assert calls == {"UNetModel": 2, "Decoder": 1}
    assert eager is not None and compiled is not None
    assert np.array_equal(np.asarray(eager.images[0]), np.asarray(compiled.images[0]))


def test_prepacked_cpu_networks_stay_eager() -> None:
    """oneDNN-prepacked layers (the CPU's fast path, model/cpu_pack.py) cannot be traced: compiled, they would fail
    at the first call, so they are left eager."""
    from model.cpu_pack import prepack

    unet_config, _, _ = tiny_configs()
    unet = UNetModel(unet_config).eval()
    assert prepack(unet) > 0
    assert compile_network(unet, "default", torch.device("cpu")) is unet


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_shapes_past_the_recompile_limit_run_eagerly() -> None:
    """With fullgraph=True dynamo raises once a network has compiled for too many shapes; the shape runs eagerly."""
    module = Scale()
    network = CompiledNetwork(module, torch.compile(module, fullgraph=True, dynamic=False, backend="eager"))
    with torch._dynamo.config.patch(recompile_limit=1):
        for rows in (1, 2, 3):  # the second shape is past the limit of 1
            x = torch.ones(rows, 4)
            assert torch.equal(network(x), x * 2)
        assert network.warned
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            network.compiled(torch.ones(4, 4))  # what the wrapper caught
