"""The sampler list the API serves agrees with what the model's samplers accept."""

from __future__ import annotations

import pytest
import torch

from core.catalog import SAMPLERS, SamplerInfo
from model.samplers import SAMPLERS as MODEL_SAMPLERS
from model.samplers import make_plan, sample
from model.schedule import NoiseSchedule


def test_every_model_sampler_is_listed_once() -> None:
    assert sorted(s.name.value for s in SAMPLERS) == sorted(MODEL_SAMPLERS)


@pytest.mark.parametrize("info", SAMPLERS, ids=[s.name.value for s in SAMPLERS])
def test_listed_options_are_the_ones_the_sampler_accepts(info: SamplerInfo) -> None:
    schedule, name = NoiseSchedule.sd15(), info.name.value
    if info.karras:
        assert make_plan(schedule, name, 4, karras=True).num_steps == 4
    else:
        with pytest.raises(ValueError, match="karras"):
            make_plan(schedule, name, 4, karras=True)

    plan = make_plan(schedule, name, 2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda: sample(plan, lambda v, t: torch.zeros_like(v), x, noise=torch.randn_like, eta=0.5)  # noqa: E731
    if info.eta:
        assert run().shape == x.shape
    else:
        with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
            run()
