"""`sdqueue generate`: a local run without a server writes numbered PNGs that a seed reproduces."""

from __future__ import annotations

import json
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


def test_generate_keeps_the_cpu_self_checks_choices_for_the_next_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    file = tmp_path / "choices" / "cpu-choices.json"
    common = ["a fox", "--checkpoint", str(tiny_checkpoint), "--width", "64", "--height", "64", "--steps", "2",
              "--seed", "5", "--device", "cpu", "--dtype", "float32", "--cpu-choices", str(file)]
    first = generate(*common, "-o", str(tmp_path / "first.png"))
    assert first.returncode == 0, first.stderr
    stored = {tuple(key.split()[1:4:2]) for key in json.loads(file.read_text())["choices"]}  # (network, kind)
    assert {network for network, _ in stored} == {"UNetModel", "AutoencoderKL", "CLIPTextModel"}
    # a kind with too few layers to decide within the pass is decided and stored at its end too: the VAE decoder
    # runs once, and its 1x1 convolutions (the mid-block attention's q, k, v, out) fill neither budget
    assert ("AutoencoderKL", "conv1x1") in stored
    second = generate(*common, "-o", str(tmp_path / "second.png"))
    assert second.returncode == 0, second.stderr
    assert "UNetModel conv3x3 layers:" in first.stderr and f"(stored in {file}" not in first.stderr
    assert f"UNetModel conv3x3 layers: packed (stored in {file}" in second.stderr or \
        f"UNetModel conv3x3 layers: plain (stored in {file}" in second.stderr  # taken, not measured again
    pixels = [np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16) for name in ("first", "second")]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # packed and plain layers agree up to summation order
    off = generate(*common[:-1], "off", "-o", str(tmp_path / "off.png"))
    assert off.returncode == 0, off.stderr
    assert "(stored in" not in off.stderr and "UNetModel conv3x3 layers:" in off.stderr  # measured again


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
