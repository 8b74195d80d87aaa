"""LoRA: the same pixels as diffusers' ``load_lora_weights`` for both file formats, the same image alone or in a
batch of other LoRAs, strict loading, the bounded cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.lora import LoraError
from model.pipeline import Pipeline
from model.requests import GenerationRequest, LoraRef
from tests.model.lora_files import allow_text_encoder_adapters, write_kohya_lora, write_peft_lora
from tests.model.reference import reference_scheduler
from tests.model.saved_pipeline import pixels, save_tiny_pipeline, tiny_pipeline

SIZE, STEPS = 64, 4
KOHYA_ALPHAS = {"unet": 6.0, "text_encoder": 3.0, "time_emb_proj": 1.0}  # write_peft_lora's alphas


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder: Path) -> Pipeline:
    return Pipeline.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    peft = write_peft_lora(d / "peft.safetensors", seed=1)
    return {
        "peft": peft,
        "kohya": write_kohya_lora(peft, d / "kohya.safetensors", KOHYA_ALPHAS),
        "other": write_peft_lora(d / "other.safetensors", seed=2, rank=8, alpha=4.0),
        "unet_only": write_peft_lora(d / "unet-only.safetensors", seed=3, text=False),
    }


def request(*loras: LoraRef, prompt: str = "a cat", seed: int = 3, guidance: float = 7.5) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt="blurry", width=SIZE, height=SIZE, steps=STEPS,
                             guidance_scale=guidance, sampler="euler", seed=seed, loras=list(loras))


def ours(pipe: Pipeline, *requests: GenerationRequest) -> list[np.ndarray]:
    return [pixels(r.images) for r in pipe.generate(list(requests)) if r is not None]


def diffusers_pixels(req: GenerationRequest, path: Path) -> np.ndarray:
    allow_text_encoder_adapters()
    pipe = tiny_pipeline(0)
    pipe.scheduler = reference_scheduler(req.sampler)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="lora")
    pipe.set_adapters(["lora"], adapter_weights=[req.loras[0].scale])
    out = pipe(req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
               guidance_scale=req.guidance_scale, generator=[torch.Generator("cpu").manual_seed(req.seed)],
               height=req.height, width=req.width, output_type="np")
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_matches_diffusers_load_lora_weights(pipe: Pipeline, loras: dict[str, Path], fmt: str) -> None:
    req = request(LoraRef(fmt, 0.7, loras[fmt]))
    [with_lora] = ours(pipe, req)
    [without] = ours(pipe, request())
    assert np.abs(with_lora - diffusers_pixels(req, loras[fmt])).max() <= 2
    assert np.abs(with_lora - without).max() > 20  # the LoRA changes the image: the comparison means something


def test_both_formats_load_the_same_layers(pipe: Pipeline, loras: dict[str, Path]) -> None:
    peft, kohya = pipe.loras.load(LoraRef("p", path=loras["peft"])), pipe.loras.load(LoraRef("k", path=loras["kohya"]))
    assert peft.unet.keys() == kohya.unet.keys() and peft.text.keys() == kohya.text.keys()
    assert {"input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.2.0.op", "output_blocks.1.2.conv",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "time_embed.0", "out.2"} <= peft.unet.keys()
    for path, adapter in peft.unet.items():
        assert adapter.scale == pytest.approx(kohya.unet[path].scale), path
    assert peft.unet["out.2"].scale == 3.0 and peft.unet["input_blocks.1.0.emb_layers.1"].scale == 0.25


def test_diffusers_files_from_before_peft_load_the_same(pipe: Pipeline, loras: dict[str, Path],
                                                       tmp_path: Path) -> None:
    with safe_open(str(loras["peft"]), framework="pt") as f:
        old = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): f.get_tensor(k)
               for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    a = pipe.loras.load(LoraRef("p", path=loras["peft"]))
    b = pipe.loras.load(LoraRef("o", path=tmp_path / "old.safetensors"))
    assert a.unet.keys() == b.unet.keys() and a.text.keys() == b.text.keys()
    assert all(torch.equal(a.unet[k].up, b.unet[k].up) and a.unet[k].scale == b.unet[k].scale for k in a.unet)


def test_a_job_is_the_same_alone_or_batched_with_other_loras(pipe: Pipeline, loras: dict[str, Path]) -> None:
    a, b = LoraRef("peft", 0.7, loras["peft"]), LoraRef("other", -0.5, loras["other"])
    unet_only = LoraRef("unet_only", 1.0, loras["unet_only"])
    jobs = [
        request(a),
        request(b, a, prompt="a dog", seed=5),  # two LoRAs at once
        request(seed=9),  # no LoRA, the same prompt as the first: its text embedding must not be the LoRA one
        request(unet_only, guidance=1.0, seed=2),  # no classifier-free guidance: one UNet row
        request(LoraRef("peft", 0.2, loras["peft"]), seed=3),  # the first job's LoRA at another scale
    ]
    alone = [ours(pipe, job)[0] for job in jobs]
    batched = ours(pipe, *jobs)
    for i, (x, y) in enumerate(zip(alone, batched, strict=True)):
        assert np.abs(x - y).max() <= 1, f"job {i}"
    assert np.abs(alone[0] - alone[4]).max() > 5  # the scale matters


def test_unknown_layer_is_an_error_naming_the_key(pipe: Pipeline, loras: dict[str, Path], tmp_path: Path) -> None:
    with safe_open(str(loras["kohya"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad = "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"
    save_file({**tensors, bad: torch.zeros(4, 32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match=bad):
        pipe.check(request(LoraRef("bad", 1.0, tmp_path / "bad.safetensors")))


def test_wrong_shape_and_unsupported_kinds_are_errors(pipe: Pipeline, tmp_path: Path) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    up = key.replace("lora_down", "lora_up")
    save_file({key: torch.zeros(4, 31), up: torch.zeros(32, 4)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraError, match=rf"{key} has shape \[4, 31\]"):
        pipe.loras.load(LoraRef("shape", path=tmp_path / "shape.safetensors"))
    dora = key.replace("lora_down.weight", "dora_scale")
    save_file({key: torch.zeros(4, 32), up: torch.zeros(32, 4), dora: torch.ones(1, 32)},
              str(tmp_path / "dora.safetensors"))
    with pytest.raises(LoraError, match="DoRA is not supported"):
        pipe.loras.load(LoraRef("dora", path=tmp_path / "dora.safetensors"))
    save_file({key: torch.zeros(4, 32)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match="no up matrix"):
        pipe.loras.load(LoraRef("half", path=tmp_path / "half.safetensors"))


def test_by_name_from_the_directory_and_missing_names(pipe: Pipeline, loras: dict[str, Path]) -> None:
    pipe.loras.configure(loras["peft"].parent, pipe.loras.max_bytes)
    assert pipe.loras.load(LoraRef("peft")).path == loras["peft"]
    with pytest.raises(LoraError, match=r"LoRA file not found: .*nothing-here\.safetensors"):
        pipe.check(request(LoraRef("nothing-here")))


def test_cache_drops_the_least_recently_used_over_its_bound(folder: Path, loras: dict[str, Path]) -> None:
    pipe = Pipeline.load(folder, device="cpu", dtype="float32")
    first = pipe.loras.load(LoraRef("a", path=loras["peft"]))
    pipe.loras.configure(None, first.nbytes + 1)  # room for about one file
    pipe.loras.load(LoraRef("b", path=loras["kohya"]))
    cache = pipe.loras.cache
    assert loras["kohya"] in cache and loras["peft"] not in cache
    assert cache.nbytes <= first.nbytes + 1
    pipe.loras.configure(None, 10 * first.nbytes)
    pipe.loras.load(LoraRef("a", path=loras["peft"]))
    assert loras["kohya"] in cache and loras["peft"] in cache
