"""Host-device traffic of a batch: its noise built on per-image CPU generators goes to the device in one copy, and
the step loop asks the device for nothing (no nonzero / item), so on CUDA it never waits for the GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import batch as batch_module
from model.device import to_device
from model.pipeline import Pipeline
from model.requests import GenerationRequest


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Pipeline:
    return Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")


def requests() -> list[GenerationRequest]:
    common: dict[str, Any] = {"width": 64, "height": 64, "steps": 3, "sampler": "euler_a"}  # ancestral: step noise
    return [GenerationRequest(prompt="a cat", seed=5, n=2, guidance_scale=7.5, **common),
            GenerationRequest(prompt="a dog", seed=9, guidance_scale=1.0, **common)]  # no CFG row for this one


def test_to_device_on_the_cpu_is_the_tensor_itself() -> None:
    t = torch.randn(2, 4, 8, 8)
    assert to_device(t, torch.device("cpu")) is t


def test_noise_goes_in_one_copy_per_batch_and_step(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[tuple[int, ...]] = []

    def counting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        copies.append(tuple(tensor.shape))
        return to_device(tensor, device)

    monkeypatch.setattr(batch_module, "to_device", counting)
    pipe.generate(requests())
    # the indices of the 2 guided rows, the initial noise of all 3 images, then each ancestral step's noise for
    # all 3 (the last step, to sigma 0, draws none)
    assert copies == [(2,), (3, 4, 8, 8), (3, 4, 8, 8), (3, 4, 8, 8)]


def test_the_step_loop_never_reads_the_device(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """nonzero() and item() wait for the GPU; the loop must choose the guided rows without them."""
    expected = pipe.generate(requests())

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a device read (nonzero / item) in the step loop")

    real_eps = batch_module.Batch.eps

    def guarded_eps(self: batch_module.Batch, *args: Any) -> torch.Tensor:
        with monkeypatch.context() as m:
            m.setattr(torch, "nonzero", forbidden)
            m.setattr(torch.Tensor, "item", forbidden)
            m.setattr(torch.Tensor, "nonzero", forbidden)
            return real_eps(self, *args)

    monkeypatch.setattr(batch_module.Batch, "eps", guarded_eps)
    got = pipe.generate(requests())
    for a, b in zip(expected, got, strict=True):
        assert a is not None and b is not None
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))
