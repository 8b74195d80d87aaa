"""The model rule at submit (core.fleet) and the queue names it routes to (core.queues.Keys)."""

from __future__ import annotations

import pytest

from core.fleet import ModelRefused, choose_model
from core.jobs import Priority
from core.queues import Keys


def test_a_named_model_must_be_served_unless_it_is_the_configured_default() -> None:
    assert choose_model(["a", "b"], "b", None) == "b"
    assert choose_model([], "a", "a") == "a"  # the default's workers may still be starting: its jobs wait
    assert choose_model(["b"], None, "a") == "a"
    with pytest.raises(ModelRefused, match=r"model 'c' is not served; the live workers hold: a, b"):
        choose_model(["a", "b"], "c", "a")
    with pytest.raises(ModelRefused, match=r"none yet \(no live worker\)"):
        choose_model([], "c", None)


def test_a_model_served_lately_still_takes_jobs_and_the_refusal_names_it() -> None:
    asked = []

    def recent() -> list[str]:
        asked.append(True)
        return ["a", "gone"]

    assert choose_model(["a"], "a", None, recent) == "a" and not asked  # live: no second look-up
    assert choose_model(["a"], "gone", None, recent) == "gone"  # its workers restart, or scaled to zero
    with pytest.raises(ModelRefused, match=r"the live workers hold: a; with no live worker now, jobs still wait for: "
                                           r"gone$"):
        choose_model(["a"], "typo", None, recent)
    assert choose_model(["a"], None, None, recent) == "a"  # a job naming none: only the live workers count


def test_without_a_name_the_only_model_served_or_any_worker() -> None:
    assert choose_model(["a"], None, None) == "a"
    assert choose_model([], None, None) is None  # no worker yet: the shared queues, as before models had names
    with pytest.raises(ModelRefused, match=r"model is required: this deployment serves several models \(a, b\)"):
        choose_model(["a", "b"], None, None)


def test_queue_names_and_the_order_a_worker_listens_in() -> None:
    keys = Keys("sdq")
    assert keys.queue(Priority.high) == "sdq-high"
    assert keys.queue(Priority.low, "sd-1.5") == "sdq-model-sd-1.5-low"
    assert keys.worker_queues("m") == ["sdq-model-m-high", "sdq-high", "sdq-model-m-normal", "sdq-normal",
                                       "sdq-model-m-low", "sdq-low"]
    for model in (None, "m", "a-high", "x-model-y"):
        for priority in Priority:
            assert keys.parse(keys.queue(priority, model)) == (model, priority)
    for other in ("sdq-webhooks", "sdq-model--low", "other-high", "sdqx-low", "sdq-model-m-urgent"):
        assert keys.parse(other) is None
