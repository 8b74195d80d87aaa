"""Device and precision choice, and that the bf16 path gives the fp32 image (up to bf16 rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import device as device_mod
from model.device import Precision, resolve_device, resolve_precision
from model.pipeline import Pipeline
from model.requests import GenerationRequest

CPU = torch.device("cpu")


def test_auto_on_cpu_follows_the_bf16_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision(CPU, "auto") == Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision(CPU, "auto") == Precision(torch.float32, torch.float32, torch.float32)


def test_a_onednn_cap_below_bf16_means_no_fast_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    device_mod.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    try:
        assert device_mod.cpu_has_fast_bf16() is False  # whatever this CPU has, oneDNN may not use it
    finally:
        device_mod.cpu_has_fast_bf16.cache_clear()


def test_explicit_dtypes_and_the_fp16_vae_guard() -> None:
    assert resolve_precision(CPU, "float32").unet == torch.float32
    assert resolve_precision(CPU, "bfloat16") == Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    # fp16 SD VAEs overflow to NaN: the VAE is kept in fp32 whenever fp16 is asked for.
    assert resolve_precision(torch.device("cuda"), "float16").vae == torch.float32
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_precision(CPU, "float16")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"):
        resolve_precision(CPU, "fp8")


def test_device_names_are_checked() -> None:
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_pipeline_matches_fp32_up_to_rounding(tiny_checkpoint: Path) -> None:
    req = GenerationRequest(prompt="a photo of a cat", width=64, height=64, steps=4, sampler="ddim", seed=5)
    images = {}
    for dtype in ("float32", "bfloat16"):
        pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype=dtype)
        result = pipe.generate([req])[0]
        assert result is not None
        images[dtype] = np.asarray(result.images[0], dtype=np.int16)
    diff = np.abs(images["float32"] - images["bfloat16"])
    assert images["bfloat16"].std() > 1.0
    assert diff.mean() < 8.0, f"bf16 drifted from fp32 by {diff.mean():.1f}/255 on average"
