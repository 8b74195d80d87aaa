from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core.jobs import JobSpec
from core.queues import JOB_FUNC, Keys
from core.settings import Settings

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


def queued_ids(redis: Redis, keys: Keys) -> dict[str, list[str]]:
    return {name: Queue(name, connection=redis).job_ids for name in keys.queues()}


def test_submit_returns_202_location_and_the_queued_job(client: TestClient, redis: Redis, keys: Keys) -> None:
    r = client.post("/v1/txt2img", json={**TINY, "seed": 1234, "n": 3})

    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "queued"
    assert body["seeds"] == [1234, 1235, 1236]
    assert body["queue_position"] == 0
    assert body["params"]["prompt"] == "a photo of a cat"
    assert queued_ids(redis, keys) == {"sdq-high": [], "sdq-normal": [body["id"]], "sdq-low": []}
    job = Job.fetch(body["id"], connection=redis)
    assert job.func_name == JOB_FUNC
    spec = JobSpec.model_validate(job.kwargs["spec"])
    assert (spec.seed, spec.params.n, spec.params.width) == (1234, 3, 64)


@pytest.mark.parametrize("seed", [None, -1])
def test_random_seed_is_resolved_and_returned(client: TestClient, seed: int | None) -> None:
    seeds = {tuple(client.post("/v1/txt2img", json={**TINY, "seed": seed, "n": 2}).json()["seeds"]) for _ in range(3)}
    assert len(seeds) == 3  # three different random seeds
    for first, second in seeds:
        assert second == first + 1 and first >= 0


def test_priority_picks_the_queue_and_position_counts_higher_queues(
    client: TestClient, redis: Redis, keys: Keys
) -> None:
    normal = [client.post("/v1/txt2img", json=TINY).json() for _ in range(2)]
    high = client.post("/v1/txt2img", json={**TINY, "priority": "high"}).json()
    low = client.post("/v1/txt2img", json={**TINY, "priority": "low"}).json()

    assert [j["queue_position"] for j in normal] == [0, 1]
    assert high["queue_position"] == 0  # nothing ahead of it in sdq-high
    assert low["queue_position"] == 3
    assert queued_ids(redis, keys)["sdq-high"] == [high["id"]]
    # Read back: the second normal job now waits behind the first and the high-priority one.
    assert client.get(f"/v1/jobs/{normal[1]['id']}").json()["queue_position"] == 2


BAD_REQUESTS: list[tuple[str, Any, str, str]] = [
    ("missing prompt", {"width": 64}, "prompt", "Field required"),
    ("empty prompt", {**TINY, "prompt": ""}, "prompt", "non-whitespace text (txt2img draws from the prompt alone"),
    ("blank prompt", {**TINY, "prompt": " \n"}, "prompt", "non-whitespace text"),
    ("width 513", {**TINY, "width": 513}, "width", "width must be a multiple of 8, got 513"),
    ("steps 0", {**TINY, "steps": 0}, "steps", "greater than or equal to 1, got 0"),
    ("steps 10000", {**TINY, "steps": 10000}, "steps", "less than or equal to 150, got 10000"),
    ("guidance NaN literal", '{"prompt": "a", "guidance_scale": NaN}', "guidance_scale", "finite number"),
    ("guidance 'NaN' string", {**TINY, "guidance_scale": "NaN"}, "guidance_scale", "finite number"),
    ("guidance Infinity", '{"prompt": "a", "guidance_scale": Infinity}', "guidance_scale", "finite number"),
    ("unknown sampler", {**TINY, "sampler": "plms"}, "sampler",
     "'ddim', 'euler', 'euler_a', 'dpmpp_2m', 'lcm' or 'tcd', got 'plms'"),
    ("20,000-char prompt", {**TINY, "prompt": "x" * 20_000}, "prompt", "at most 4000 characters"),
    ("prompt is a number", {**TINY, "prompt": 12}, "prompt", "valid string, got 12"),
    ("width is a word", {**TINY, "width": "wide"}, "width", "valid integer"),
    ("n is a list", {**TINY, "n": [2]}, "n", "valid integer, got a list"),
    ("guidance is an object", {**TINY, "guidance_scale": {"v": 7}}, "guidance_scale", "valid number, got an object"),
    ("unknown field", {**TINY, "cfg": 7}, "cfg", "Extra inputs are not permitted"),
    ("body is a list", [TINY], "body", "valid dictionary"),
    ("not JSON", "{prompt: a", "body", "JSON decode error"),
]


@pytest.mark.parametrize(("case", "payload", "field", "rule"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_422_naming_field_and_rule_and_nothing_is_enqueued(
    client: TestClient, redis: Redis, keys: Keys, case: str, payload: Any, field: str, rule: str
) -> None:
    content = payload if isinstance(payload, str) else json.dumps(payload)
    r = client.post("/v1/txt2img", content=content, headers={"content-type": "application/json"})

    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("invalid_request", field), error
    assert error["message"].startswith(field), error
    assert rule in error["message"], error
    assert len(r.content) < 1000  # the 20,000-char input is summarised, not echoed
    assert queued_ids(redis, keys) == {name: [] for name in keys.queues()}
    assert redis.keys("rq:job:*") == []


def test_full_queue_answers_503_with_retry_after(settings: Settings, redis: Redis) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_queued_jobs": 2}))) as client:
        assert [client.post("/v1/txt2img", json=TINY).status_code for _ in range(2)] == [202, 202]
        r = client.post("/v1/txt2img", json=TINY)

    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"] == {"type": "queue_full", "field": None,
                                 "message": "queue full: 2 jobs waiting (SDQ_MAX_QUEUED_JOBS); retry later"}
    assert len(Queue("sdq-normal", connection=redis)) == 2


async def _submit_concurrently(app: FastAPI, count: int) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        return await asyncio.gather(*[http.post("/v1/txt2img", json=TINY) for _ in range(count)])


def test_concurrent_submissions_are_all_queued_with_distinct_positions(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    responses = asyncio.run(_submit_concurrently(create_app(settings), 200))

    assert {r.status_code for r in responses} == {202}
    assert sorted(r.json()["queue_position"] for r in responses) == list(range(200))
    assert set(queued_ids(redis, keys)["sdq-normal"]) == {r.json()["id"] for r in responses}


def test_concurrent_submissions_stop_at_the_queue_limit(settings: Settings, redis: Redis) -> None:
    app = create_app(settings.model_copy(update={"max_queued_jobs": 50}))
    responses = asyncio.run(_submit_concurrently(app, 120))

    assert sorted(r.status_code for r in responses) == [202] * 50 + [503] * 70
    assert len(Queue("sdq-normal", connection=redis)) == 50
