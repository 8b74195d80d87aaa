"""Folders written by diffusers' own ``StableDiffusionPipeline.save_pretrained``: every weight layout it writes
loads strictly, and our pipeline and ``sdqueue generate`` draw diffusers' pixels from them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.weights import CheckpointError, Components, load_components
from tests.model.saved_pipeline import LONG_PROMPT, diffusers_pixels, pixels, save_tiny_pipeline, tiny_pipeline
from tests.model.test_generate_cli import generate


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("saved") / "tiny-sd")


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def weights(c: Components) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in (("unet", c.unet), ("vae", c.vae), ("text", c.text_encoder))
            for k, v in module.state_dict().items()}


def test_save_pretrained_layout(saved: Path) -> None:
    """What current diffusers and transformers write: safetensors per component, a tokenizer.json and no
    vocab.json / merges.txt, configs carrying _class_name / _diffusers_version and keys we do not use."""
    assert files(saved) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    unet_config = json.loads((saved / "unet" / "config.json").read_text())
    assert {"_class_name", "_diffusers_version", "reverse_transformer_layers_per_block"} <= set(unet_config)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
def test_pipeline_matches_diffusers_on_a_saved_folder(saved: Path, sampler: str) -> None:
    req = GenerationRequest(prompt=LONG_PROMPT, negative_prompt="blurry, <|endoftext|> LOW quality", width=64,
                            height=64, steps=5, guidance_scale=6.0, sampler=sampler, karras=sampler == "dpmpp_2m",
                            seed=21, n=2)
    result = Pipeline.load(saved, device="cpu", dtype="float32").generate([req])[0]
    assert result is not None and not result.prompt_truncated
    assert (result.prompt_tokens, result.prompt_chunks) == (96, 2)
    ours = pixels(result.images)
    assert np.abs(ours - diffusers_pixels(saved, req)).max() <= 2
    assert ours.std() > 1.0


def save_variant(folder: Path, layout: str) -> Path:
    """The same pipeline (seed 0) saved as ``layout``; fp16 layouts hold the weights rounded to float16."""
    pipe = tiny_pipeline(seed=0)
    if layout == "full+fp16":  # what many published repositories hold: both, side by side
        pipe.save_pretrained(folder)
    if "fp16" in layout:
        pipe.to(torch.float16)
    shard = {"max_shard_size": "200KB"} if layout.startswith("sharded") else {}
    pipe.save_pretrained(folder, variant="fp16" if "fp16" in layout else None, **shard)
    return folder


@pytest.mark.parametrize(
    ("layout", "expected_files"),
    [
        ("fp16", [r"unet/diffusion_pytorch_model\.fp16\.safetensors", r"text_encoder/model\.fp16\.safetensors"]),
        ("sharded", [r"unet/diffusion_pytorch_model\.safetensors\.index\.json",
                     r"unet/diffusion_pytorch_model-00001-of-000\d\d\.safetensors",
                     r"text_encoder/model\.safetensors\.index\.json",
                     r"text_encoder/model-00001-of-0000\d\.safetensors"]),
        ("sharded-fp16", [r"unet/diffusion_pytorch_model\.safetensors\.index\.fp16\.json",
                          r"unet/diffusion_pytorch_model\.fp16-00001-of-000\d\d\.safetensors",
                          r"text_encoder/model\.safetensors\.index\.fp16\.json",
                          r"text_encoder/model\.fp16-00001-of-0000\d\.safetensors"]),
        ("full+fp16", [r"unet/diffusion_pytorch_model\.safetensors",
                       r"unet/diffusion_pytorch_model\.fp16\.safetensors"]),
    ],
)
def test_weight_layouts_load_the_same_weights(
    saved: Path, tmp_path: Path, layout: str, expected_files: list[str]
) -> None:
    folder = save_variant(tmp_path / layout, layout)
    written = files(folder)
    assert all(any(re.fullmatch(pattern, name) for name in written) for pattern in expected_files), written
    reference = weights(load_components(saved))
    loaded = weights(load_components(folder))
    assert loaded.keys() == reference.keys()
    half = layout in ("fp16", "sharded-fp16")  # full+fp16: the full-precision files are preferred
    for key, value in reference.items():
        assert torch.equal(loaded[key], value.half().float() if half and value.is_floating_point() else value), key


def test_sharded_weights_stay_strict(tmp_path: Path) -> None:
    folder = save_variant(tmp_path / "sharded", "sharded")
    index = json.loads((folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = folder / "unet" / index["weight_map"]["conv_out.bias"]
    tensors = load_file(shard)
    del tensors["conv_out.bias"]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n    unet/conv_out\.bias"):
        load_components(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json names shards that are not in the folder: {shard.name}"):
        load_components(folder)


def test_unknown_config_keys_are_ignored(saved: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved, tmp_path / "future")
    for config in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                   "scheduler/scheduler_config.json", "model_index.json"):
        data = json.loads((folder / config).read_text())
        data |= {"_name_or_path": "someone/some-model", "_diffusers_version": "9.9.9", "an_option_from_later": 3}
        (folder / config).write_text(json.dumps(data))
    assert all(torch.equal(a, b) for a, b in zip(weights(load_components(folder)).values(),
                                                  weights(load_components(saved)).values(), strict=True))


def test_missing_weights_list_what_the_folder_holds(saved: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved, tmp_path / "renamed")
    weights_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights_file.rename(weights_file.with_name("diffusion_pytorch_model.bf16.safetensors"))
    message = r"vae: no weights found; expected diffusion_pytorch_model\.safetensors .* holds config\.json, diff"
    with pytest.raises(CheckpointError, match=message):
        load_components(folder)


def test_generate_cli_on_a_saved_folder(saved: Path, tmp_path: Path) -> None:
    run = generate(LONG_PROMPT, "--checkpoint", str(saved), "--width", "64", "--height", "64", "--steps", "4",
                   "--sampler", "euler", "--guidance-scale", "5", "--seed", "8", "--n", "2", "--dtype", "float32",
                   "--device", "cpu", "-o", str(tmp_path / "out.png"))
    assert run.returncode == 0, run.stderr
    ours = pixels([Image.open(tmp_path / f"out-{i}.png").convert("RGB") for i in range(2)])
    req = GenerationRequest(prompt=LONG_PROMPT, width=64, height=64, steps=4, guidance_scale=5.0, sampler="euler",
                            seed=8, n=2)
    assert np.abs(ours - diffusers_pixels(saved, req)).max() <= 2
    assert re.search(r"seed=9", run.stdout)


def test_a_tokenizer_longer_than_the_text_encoder_is_refused_at_load(saved: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved, tmp_path / "long-tokenizer")
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    positions = json.loads((folder / "text_encoder" / "config.json").read_text())["max_position_embeddings"]
    config["model_max_length"] = positions + 1
    config_path.write_text(json.dumps(config))
    expected = rf"model_max_length \({positions + 1}\) exceeds the text encoder's {positions} positions"
    with pytest.raises(ValueError, match=expected):
        Pipeline.load(folder, device="cpu", dtype="float32")
