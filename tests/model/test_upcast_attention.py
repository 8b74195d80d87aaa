"""``upcast_attention`` (SD 2.1's UNet config; the original SD 2 code always does it): attention scores in fp32 under
bf16 on the CPU, a no-op in fp32; read from a diffusers config, set for SD 2.x single files, off for SD 1.x."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from model.attention import attention
from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.unet import CrossAttention, UNetModel
from model.weights import load_components, save_single_file
from tests.model.saved_pipeline import pixels
from tests.model.sd2_reference import reference_pipeline, reference_pixels, save_sd2_folder, sd2_configs


def peaked(shape: tuple[int, ...], seed: int, scale: float) -> torch.Tensor:
    """bf16 values; ``scale`` 6 gives q·k/√d of standard deviation ~36, the peaked attention of trained layers."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def test_upcast_scores_agree_with_fp32_on_the_bf16_cpu_path() -> None:
    q, k, v = peaked((2, 4, 256, 64), 0, 6.0), peaked((2, 4, 77, 64), 1, 6.0), peaked((2, 4, 77, 64), 2, 1.0)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[1, 40:] = False
    exact = attention(q.float(), k.float(), v.float(), mask)  # the same bf16 inputs, in fp32
    plain = (attention(q, k, v, mask).float() - exact).abs().max().item()
    upcast = (attention(q, k, v, mask, upcast=True).float() - exact).abs().max().item()
    assert upcast < 0.02  # the output's own bf16 rounding (|v| up to ~4)
    assert plain > 10 * upcast  # bf16 scores (8 mantissa bits) move the softmax's peaks


def test_upcast_changes_nothing_in_fp32() -> None:
    q, k, v = (peaked((1, 2, 64, 16), seed, 3.0).float() for seed in range(3))
    assert torch.equal(attention(q, k, v, upcast=True), attention(q, k, v))


def cross_attention_errors(upcast: bool) -> tuple[float, float]:
    """Max and mean error of a bf16 cross-attention layer with peaked scores (q and k projections scaled up),
    against the same bf16 weights and inputs in fp32."""
    torch.manual_seed(0)
    layer = CrossAttention(64, 32, heads=2, head_dim=32, upcast=upcast).eval()
    with torch.no_grad():
        layer.to_q.weight.mul_(10.0)
        layer.to_k.weight.mul_(10.0)
    layer = layer.bfloat16()
    x, context = peaked((2, 256, 64), 3, 1.0), peaked((2, 77, 32), 4, 1.0)
    with torch.no_grad():
        got = layer(x, context).float()
        error = (got - layer.float()(x.float(), context.float())).abs()
    return float(error.max()), float(error.mean())


def test_upcast_improves_a_bf16_unet_attention_layer() -> None:
    """Smaller, not 10x: here the q and k projections' own bf16 rounding is part of the error."""
    upcast, plain = cross_attention_errors(True), cross_attention_errors(False)
    assert upcast[0] * 1.2 < plain[0] and upcast[1] * 1.2 < plain[1], (upcast, plain)


def test_unet_in_fp32_is_bit_identical_and_bf16_differs() -> None:
    config = sd2_configs()[0]
    torch.manual_seed(0)
    plain = UNetModel(config).eval()
    upcast = UNetModel(dataclasses.replace(config, upcast_attention=True)).eval()
    upcast.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999.0, 500.0])
    with torch.no_grad():
        assert torch.equal(plain(x, t, context, None), upcast(x, t, context, None))
        plain, upcast = plain.bfloat16(), upcast.bfloat16()
        x, context = x.bfloat16(), context.bfloat16()
        assert not torch.equal(plain(x, t, context, None), upcast(x, t, context, None))


@pytest.fixture(scope="module")
def upcast_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2.1-like folder: v-prediction, and ``upcast_attention: true`` in its UNet config."""
    folder = save_sd2_folder(tmp_path_factory.mktemp("sd21") / "tiny-sd21")
    config_file = folder / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "upcast_attention": True}))
    return folder


def test_flag_read_from_the_folder_and_fp32_parity_unchanged(upcast_folder: Path) -> None:
    pipe = Pipeline.load(upcast_folder, device="cpu", dtype="float32")
    assert pipe.components.unet_config.upcast_attention
    req = GenerationRequest(prompt="a photo of a cat", width=64, height=64, steps=4, sampler="euler", seed=5)
    ours = pixels(pipe.generate([req])[0].images)  # type: ignore[union-attr]
    reference = reference_pipeline(StableDiffusionPipeline, upcast_folder, "euler")
    assert reference.unet.config.upcast_attention
    theirs = reference_pixels(reference, req.seed, 1, prompt=req.prompt, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale, height=64, width=64)
    assert np.abs(ours - theirs).max() <= 2


def test_single_files_upcast_for_sd2_only(upcast_folder: Path, tiny_checkpoint: Path) -> None:
    sd2 = save_single_file(load_components(upcast_folder), upcast_folder.with_name("tiny-sd21.safetensors"))
    assert load_components(sd2).unet_config.upcast_attention  # as the original SD 2 code, for every SD 2 file
    assert not load_components(tiny_checkpoint).unet_config.upcast_attention  # SD 1.x: unchanged
