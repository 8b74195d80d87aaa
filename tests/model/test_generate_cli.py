"""`sdqueue generate`: a local run without a server writes numbered PNGs that a seed reproduces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdqueue", "generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_generate_writes_numbered_files_and_a_seed_reproduces_them(tiny_checkpoint: Path, tmp_path: Path) -> None:
    common = ["a photo of a cat", "--checkpoint", str(tiny_checkpoint), "--width", "64", "--height", "72",
              "--steps", "3", "--sampler", "dpmpp_2m", "--karras", "--dtype", "float32"]
    run = generate(*common, "--seed", "10", "--n", "2", "-o", str(tmp_path / "cat.png"))
    assert run.returncode == 0, run.stderr
    first, second = Image.open(tmp_path / "cat-0.png"), Image.open(tmp_path / "cat-1.png")
    assert first.size == (64, 72) and first.mode == "RGB"
    assert "seed=10" in run.stdout and "seed=11" in run.stdout
    again = generate(*common, "--seed", "11", "-o", str(tmp_path / "again.png"))  # seed 11 alone = image 1 of seed 10
    assert again.returncode == 0, again.stderr
    diff = np.abs(np.asarray(Image.open(tmp_path / "again.png"), dtype=np.int16) - np.asarray(second, dtype=np.int16))
    assert diff.max() <= 1
    assert "steps" in run.stderr  # the progress bar


def test_generate_img2img_and_clear_errors(tiny_checkpoint: Path, tmp_path: Path) -> None:
    Image.new("RGB", (70, 64), (200, 30, 30)).save(tmp_path / "red.png")
    run = generate("a boat", "--checkpoint", str(tiny_checkpoint), "--init-image", str(tmp_path / "red.png"),
                   "--strength", "0.5", "--steps", "4", "-o", str(tmp_path / "boat.png"))
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "boat.png").size == (64, 64)  # the init image's size, rounded down to 8
    missing = generate("x", "--checkpoint", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "nope.safetensors" in missing.stderr
    bad = generate("x", "--checkpoint", str(tiny_checkpoint), "--steps", "0", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "steps must be between 1 and 150, got 0" in bad.stderr


def test_an_sdxl_model_draws_at_its_own_size_unless_one_is_given(tmp_path: Path) -> None:
    from tests.model.sdxl_reference import save_sdxl_folder

    folder = save_sdxl_folder(tmp_path / "tiny-sdxl", seed=1)
    common = ["a lighthouse", "--checkpoint", str(folder), "--steps", "1", "--sampler", "euler", "--dtype",
              "float32", "--guidance-scale", "1"]
    run = generate(*common, "-o", str(tmp_path / "native.png"))
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "native.png").size == (1024, 1024)
    run = generate(*common, "--width", "96", "-o", str(tmp_path / "given.png"))
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "given.png").size == (96, 512)  # a side given: the other is the usual default
