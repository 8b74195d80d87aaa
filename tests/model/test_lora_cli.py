"""`sdqueue generate --lora PATH[:SCALE]` and `<lora:name:weight>` prompt tags: the pipeline's LoRA pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.pipeline import Pipeline
from model.requests import GenerationRequest, LoraRef
from tests.model.lora_files import write_peft_lora
from tests.model.test_generate_cli import generate


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_applies_loras_by_path_and_by_prompt_tag(tiny_checkpoint: Path, tmp_path: Path) -> None:
    lora = write_peft_lora(tmp_path / "loras" / "style.safetensors", seed=4)
    common = ["--checkpoint", str(tiny_checkpoint), "--width", "64", "--height", "64", "--steps", "3",
              "--sampler", "euler", "--seed", "5", "--dtype", "float32", "--device", "cpu"]
    by_path = generate("a red house", *common, "--lora", f"{lora}:0.7", "-o", str(tmp_path / "path.png"))
    assert by_path.returncode == 0, by_path.stderr
    by_tag = generate("a red house <lora:style:0.7>", *common, "--lora-dir", str(lora.parent),
                      "-o", str(tmp_path / "tag.png"))
    assert by_tag.returncode == 0, by_tag.stderr
    plain = generate("a red house", *common, "-o", str(tmp_path / "plain.png"))
    assert plain.returncode == 0, plain.stderr

    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    req = GenerationRequest(prompt="a red house", width=64, height=64, steps=3, sampler="euler", seed=5,
                            loras=[LoraRef("style", 0.7, lora)])
    [result] = pipe.generate([req])
    assert result is not None
    expected = np.asarray(result.images[0], dtype=np.int16)
    assert np.abs(read(tmp_path / "path.png") - expected).max() <= 1
    assert np.abs(read(tmp_path / "tag.png") - expected).max() <= 1
    assert np.abs(read(tmp_path / "plain.png") - expected).max() > 10


def test_generate_names_a_missing_lora(tiny_checkpoint: Path, tmp_path: Path) -> None:
    run = generate("a cat", "--checkpoint", str(tiny_checkpoint), "--steps", "1", "--width", "64", "--height", "64",
                   "--lora", str(tmp_path / "absent.safetensors"), "-o", str(tmp_path / "x.png"))
    assert run.returncode == 2
    assert "LoRA file not found" in run.stderr and "absent.safetensors" in run.stderr
