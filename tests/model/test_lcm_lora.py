"""LCM with an LCM-LoRA (a UNet-only LoRA on a base model, as latent-consistency/lcm-lora-sdv1-5 ships): the same
pixels as diffusers' LCMScheduler with ``load_lora_weights``, and the same image alone or batched with plain jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.pipeline import Pipeline
from model.requests import GenerationRequest, LoraRef
from tests.model.lora_files import write_peft_lora
from tests.model.saved_pipeline import pixels, save_tiny_pipeline, tiny_pipeline
from tests.model.test_lcm import lcm_scheduler

SIZE = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lcm_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_lora(tmp_path_factory.mktemp("loras") / "lcm-lora.safetensors", seed=4, text=False)


def request(*loras: LoraRef, seed: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", width=SIZE, height=SIZE, steps=4, guidance_scale=1.0, sampler="lcm",
                             seed=seed, loras=list(loras))


def run(pipe: Pipeline, *requests: GenerationRequest) -> list[np.ndarray]:
    return [pixels(r.images) for r in pipe.generate(list(requests)) if r is not None]


def test_lcm_lora_matches_diffusers(pipe: Pipeline, lcm_lora: Path) -> None:
    req = request(LoraRef("lcm-lora", 1.0, lcm_lora))
    [ours] = run(pipe, req)
    reference = tiny_pipeline(0)
    reference.scheduler = lcm_scheduler()
    reference.load_lora_weights(str(lcm_lora.parent), weight_name=lcm_lora.name, adapter_name="lcm")
    out = reference(req.prompt, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE,
                    generator=[torch.Generator("cpu").manual_seed(req.seed)], output_type="np")
    theirs = np.round(out.images * 255).astype(np.int16)
    assert np.abs(ours - theirs).max() <= 2
    [plain] = run(pipe, request())
    assert np.abs(ours - plain).max() > 20  # the LoRA acted: the comparison can fail


def test_lcm_lora_job_is_the_same_alone_and_batched_with_plain_lcm_jobs(pipe: Pipeline, lcm_lora: Path) -> None:
    with_lora = request(LoraRef("lcm-lora", 1.0, lcm_lora), seed=8)
    plain = request(seed=9)
    [alone] = run(pipe, with_lora)
    together = run(pipe, plain, with_lora, plain)
    assert np.abs(together[1] - alone).max() <= 1
