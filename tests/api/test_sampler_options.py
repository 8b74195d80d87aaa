"""Sampler options a sampler does not take are refused at submit (core.rules), not failed later by the worker."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"sampler": "ddim", "karras": True}, "karras", "karras sigmas apply to euler, euler_a, dpmpp_2m, not ddim"),
        ({"sampler": "euler_a", "eta": 0.5}, "eta", "eta applies to ddim, tcd only, got eta 0.5 with euler_a"),
        ({"eta": 0.3}, "eta", "eta applies to ddim, tcd only, got eta 0.3 with euler_a"),  # the default sampler
    ],
)
def test_an_option_the_sampler_does_not_take_is_a_422_naming_it(
    client: TestClient, fields: dict[str, Any], field: str, message: str
) -> None:
    r = client.post("/v1/txt2img", json={**TINY, **fields})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == field and message in error["message"]


@pytest.mark.parametrize("fields", [{"sampler": "ddim", "eta": 1.0}, {"sampler": "dpmpp_2m", "karras": True}])
def test_options_the_sampler_takes_are_accepted(client: TestClient, fields: dict[str, Any]) -> None:
    r = client.post("/v1/txt2img", json={**TINY, **fields})
    assert r.status_code == 202, r.text
    assert all(r.json()["params"][k] == v for k, v in fields.items())
