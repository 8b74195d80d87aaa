"""The sampler list the API serves (``core.rules``) agrees with what the model's samplers implement and accept."""

from __future__ import annotations

import pytest
import torch

from core.catalog import SAMPLERS, SamplerInfo
from core.rules import SAMPLER_NAMES
from model.samplers import STEP_FUNCTIONS, make_plan, sample
from model.schedule import NoiseSchedule


def test_every_sampler_of_the_table_is_listed_once_and_implemented() -> None:
    assert [s.name.value for s in SAMPLERS] == list(SAMPLER_NAMES)
    assert sorted(STEP_FUNCTIONS) == sorted(SAMPLER_NAMES)


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
        with pytest.raises(ValueError, match="eta applies to ddim, tcd only"):
            run()
