"""bench/gpu.py keeps working between the GPU runs it is written for: its smoke mode runs every measure on tiny
networks on the CPU, and without a CUDA device the real mode says so and exits 2."""

from __future__ import annotations

import pytest
import torch

from bench import gpu


def test_smoke_run_prints_every_measure(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| measure")]
    measures = {line.split(" | ")[0].removeprefix("| ") for line in rows}
    assert {"max abs eps diff", "image PSNR", "compile time", "UNet it/s, batch 1 + CFG",
            "images/s, 64x64, 2 steps, batch 1", "images/s, 64x64, 2 steps, batch 2",
            "VAE decode ms, 64x64, batch 1", "VAE decode ms, 64x64, batch 8"} <= measures
    assert not any("skipped" in row or "not run" in row for row in rows)
    # diffusers' pipeline ran on our weights (every tensor found through the loader's name tables)
    assert sum(gpu.DIFFUSERS in row for row in rows) == 2
    psnr = next(row for row in rows if row.startswith("| image PSNR"))
    assert float(psnr.split(" | ")[2].removesuffix(" dB")) > 20  # bf16 vs fp32 of the same weights: one image


def test_without_cuda_it_says_so_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--smoke" in err
