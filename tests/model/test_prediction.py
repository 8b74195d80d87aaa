"""The prediction type: v -> ε in the sampler, the rule for files that do not say it (model/prediction.py) on UNets
whose answers are known, and the SDQ_PREDICTION_TYPE setting and --prediction-type option.

Random tiny weights say nothing about ε or v (the probe's answer on them is arbitrary), so the probe is tested on
the best possible ε and v predictors for Gaussian data of several means and spreads, whose outputs are known in
closed form, and the loading paths with the probe replaced."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.settings import SettingsError, load_settings
from model import prediction
from model.pipeline import Pipeline
from model.samplers import make_plan
from model.schedule import NoiseSchedule
from model.weights import save_random_checkpoint
from tests.model.sd2_reference import sd2_configs

ROOT = Path(__file__).resolve().parents[2]


def gaussian_predictor(kind: str, mean: float, std: float) -> prediction.ProbeUNet:
    """E[ε | x_t] or E[v | x_t] for data x_0 ~ N(mean, std²) per value, at the probe's timestep (SD's schedule)."""
    alpha_bar = float(NoiseSchedule.sd15().alphas_cumprod[int(prediction.PROBE_TIMESTEP)])
    a, b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)

    def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: None) -> torch.Tensor:
        x = x[:, :4]
        x0 = mean + a * std**2 / (a * a * std**2 + b * b) * (x - a * mean)  # the posterior mean of x_0
        eps = (x - a * x0) / b
        return eps if kind == "epsilon" else a * eps - b * x0

    return unet


@pytest.mark.parametrize("mean", [-0.8, 0.0, 0.9])
@pytest.mark.parametrize("std", [0.5, 1.0, 2.0])
def test_probe_tells_epsilon_from_v_on_ideal_predictors(mean: float, std: float) -> None:
    context = torch.zeros(1, 77, 8)
    for kind in ("epsilon", "v_prediction"):
        unet = gaussian_predictor(kind, mean, std)
        assert prediction.looks_like_v_prediction(unet, 4, context) == (kind == "v_prediction"), (kind, mean, std)


def test_probe_on_a_real_unet_runs_once_and_returns_a_verdict() -> None:
    """The statistic is computed through our UNetModel (9 input channels too); its value on random weights is
    meaningless, but it is finite and the verdict follows the threshold."""
    from model.unet import UNetModel

    unet_config, _, _ = sd2_configs()
    for channels in (4, 9):
        torch.manual_seed(0)
        unet = UNetModel(dataclasses.replace(unet_config, in_channels=channels)).eval()
        slope = prediction.probe_slope(unet, channels, torch.zeros(1, 77, unet_config.context_dim))
        assert math.isfinite(slope)


def never(name: str) -> bool:
    raise AssertionError(f"the probe ran for {name}")


def test_rule() -> None:
    resolve = prediction.resolve_prediction_type
    assert resolve("v_prediction", {"prediction_type": "epsilon"}, False, lambda: never("a choice")) == "v_prediction"
    assert resolve("epsilon", None, True, lambda: never("a choice")) == "epsilon"
    assert resolve("auto", {"prediction_type": "v_prediction"}, True, lambda: never("a folder")) == "v_prediction"
    assert resolve("auto", {}, True, lambda: never("a folder")) == "epsilon"
    assert resolve("auto", None, False, lambda: never("SD 1.x")) == "epsilon"
    assert resolve("auto", None, True, lambda: True) == "v_prediction"
    assert resolve("auto", None, True, lambda: False) == "epsilon"
    assert resolve("auto", None, True, lambda: never("an inpainting UNet"), inpaint=True) == "epsilon"
    assert resolve("v_prediction", None, True, lambda: never("a choice"), inpaint=True) == "v_prediction"
    with pytest.raises(ValueError, match=r"prediction_type must be one of auto, epsilon, v_prediction, got 'eps'"):
        resolve("eps", None, True, lambda: True)


def test_single_files_probe_only_for_open_clip(tiny_checkpoint: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake(unet: prediction.ProbeUNet, in_channels: int, context: torch.Tensor) -> bool:
        calls.append(in_channels)
        assert context.shape == (1, 77, 32)  # the empty prompt through the file's text encoder
        return True

    monkeypatch.setattr(prediction, "looks_like_v_prediction", fake)
    assert Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32").schedule.prediction_type == "epsilon"
    assert calls == []  # SD 1.x: nothing runs
    sd2 = save_random_checkpoint(tmp_path / "sd2.safetensors", *sd2_configs())
    assert Pipeline.load(sd2, device="cpu", dtype="float32").schedule.prediction_type == "v_prediction"
    assert calls == [4]
    assert Pipeline.load(sd2, device="cpu", dtype="float32",
                         prediction_type="epsilon").schedule.prediction_type == "epsilon"
    assert calls == [4]  # an explicit choice runs nothing


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_eps_from_v_recovers_the_noise(sampler: str) -> None:
    """For x_t = √ᾱ·x_0 + √(1-ᾱ)·ε (in the sampler's own scaling) and v = √ᾱ·ε - √(1-ᾱ)·x_0, ε comes back."""
    schedule = NoiseSchedule.from_diffusers_config({"prediction_type": "v_prediction"})
    plan = make_plan(schedule, sampler, 10)
    assert plan.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for step in (0, 5, 9):
        sigma = float(plan.sigmas[step])
        a, b = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        x = plan.add_noise(x0, eps, step)
        v = a * eps - b * x0
        torch.testing.assert_close(plan.eps_from_v(v, plan.model_input(x, step), step), eps, atol=1e-5, rtol=0)


def test_setting_rejects_an_unknown_prediction_type() -> None:
    assert load_settings(prediction_type="v_prediction").prediction_type == "v_prediction"
    assert load_settings().prediction_type == "auto"
    with pytest.raises(SettingsError, match=r"SDQ_PREDICTION_TYPE: Input should be 'auto', 'epsilon' or "
                                            r"'v_prediction' \(got 'v-pred'\)"):
        load_settings(prediction_type="v-pred")


def test_generate_takes_a_prediction_type(tmp_path: Path) -> None:
    sd2 = save_random_checkpoint(tmp_path / "sd2.safetensors", *sd2_configs())
    common = [sys.executable, "-m", "sdqueue", "generate", "a cat", "--checkpoint", str(sd2), "--width", "64",
              "--height", "64", "--steps", "2", "--dtype", "float32", "--device", "cpu"]
    run = subprocess.run([*common, "--prediction-type", "v_prediction", "-o", str(tmp_path / "v.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "v.png").is_file()
    bad = subprocess.run([*common, "--prediction-type", "sample"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'sample'" in bad.stderr
