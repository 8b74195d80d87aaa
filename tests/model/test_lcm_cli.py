"""`sdqueue generate --sampler lcm --tiny-vae PATH`: the CLI runs LCM and decodes with TAESD, as the pipeline does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.pipeline import Pipeline
from model.requests import GenerationRequest
from model.taesd import DECODER_FILE
from tests.model.test_generate_cli import generate
from tests.model.test_taesd import random_taesd, write_single_files


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_files(random_taesd(seed=7), Path(tmp_path_factory.mktemp("taesd")))


def test_generate_with_lcm_and_the_tiny_vae(tiny_checkpoint: Path, taesd_files: Path, tmp_path: Path) -> None:
    common = ["a photo of a cat", "--checkpoint", str(tiny_checkpoint), "--width", "64", "--height", "72",
              "--steps", "4", "--sampler", "lcm", "--guidance-scale", "1", "--seed", "5", "--dtype", "float32"]
    tiny = generate(*common, "--tiny-vae", str(taesd_files / DECODER_FILE), "-o", str(tmp_path / "tiny.png"))
    assert tiny.returncode == 0, tiny.stderr
    full = generate(*common, "-o", str(tmp_path / "full.png"))
    assert full.returncode == 0, full.stderr
    tiny_px = np.asarray(Image.open(tmp_path / "tiny.png"), dtype=np.int16)
    assert tiny_px.shape == (72, 64, 3)

    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32", tiny_vae=taesd_files)
    req = GenerationRequest(prompt="a photo of a cat", width=64, height=72, steps=4, sampler="lcm",
                            guidance_scale=1.0, seed=5, vae="tiny")
    result = pipe.generate([req])[0]
    assert result is not None
    assert np.abs(np.asarray(result.images[0], dtype=np.int16) - tiny_px).max() <= 1
    full_px = np.asarray(Image.open(tmp_path / "full.png"), dtype=np.int16)
    assert np.abs(full_px - tiny_px).max() > 10  # --tiny-vae changed the decoder


def test_lcm_refuses_more_steps_than_it_was_distilled_on(tiny_checkpoint: Path, tmp_path: Path) -> None:
    run = generate("x", "--checkpoint", str(tiny_checkpoint), "--sampler", "lcm", "--steps", "60",
                   "-o", str(tmp_path / "x.png"))
    assert run.returncode == 2 and "steps must be at most 50 with sampler lcm, got 60" in run.stderr
