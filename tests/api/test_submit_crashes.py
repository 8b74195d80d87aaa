"""Submissions cut short anywhere: a retry with the same Idempotency-Key finds the job or gets to queue it, and an
enqueue whose reply was lost is answered by what Redis holds, not by the lost reply."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import Response
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue

from api.auth import ANONYMOUS
from api.intake import IDEMPOTENCY_TTL_S, PENDING_TTL_S, Intake
from api.main import create_app
from api.submitter import Submitter
from core import jobstore
from core.jobs import Txt2ImgRequest
from core.queues import Keys
from core.settings import Settings
from tests.core.test_jobstore import Killed, enqueue_reply_lost
from tests.images import noise_image, png_b64

TXT2IMG = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "seed": 7}
IMG2IMG = {"prompt": "a photo of a cat", "steps": 4, "strength": 0.5, "seed": 7, "image": png_b64(noise_image(64, 64))}


def submit(client: TestClient, key: str = "order-1") -> Any:
    return client.post("/v1/img2img", json=IMG2IMG, headers={"Idempotency-Key": key})


def inputs(settings: Settings) -> list[Path]:
    images = settings.data_dir / "images"
    return sorted(p.relative_to(images) for p in images.rglob("*.png")) if images.exists() else []


def record(redis: Redis, keys: Keys) -> tuple[str, int]:
    [key] = redis.keys(keys.idempotency(None, "*"))
    return redis.get(key).decode(), redis.ttl(key)  # type: ignore[union-attr]


def queued(redis: Redis) -> list[str]:
    return Queue("sdq-normal", connection=redis).job_ids


def dies_submitting(settings: Settings) -> None:
    """An API process that dies (Killed) while it submits TXT2IMG with Idempotency-Key order-1. (In process, a
    BaseException stands for the death: no handler runs, no cleanup; the app is not used again.)"""
    services = create_app(settings).state.services
    request = Txt2ImgRequest.model_validate(TXT2IMG)

    async def run() -> None:
        intake = Intake(services, ANONYMOUS, None, "order-1")
        await intake.accept(jobstore.new_job_spec(request, "txt2img"), Response(), request)

    with pytest.raises(Killed):
        asyncio.run(run())


def submit_txt2img(client: TestClient) -> Any:
    return client.post("/v1/txt2img", json=TXT2IMG, headers={"Idempotency-Key": "order-1"})


def test_a_key_claimed_by_a_request_that_died_before_enqueueing_is_taken_over_once_the_claim_lapses(
    client: TestClient, settings: Settings, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def dies(self: Submitter, *args: Any) -> int:
        raise Killed  # the API process dies between the claim and the enqueue

    with monkeypatch.context() as patch:
        patch.setattr(Submitter, "submit", dies)
        dies_submitting(settings)
    value, ttl = record(redis, keys)
    assert value.endswith(":pending") and 0 < ttl <= PENDING_TTL_S < 120, (value, ttl)
    assert queued(redis) == []

    again = submit_txt2img(client)  # the first request may still be on its way: wait
    assert again.status_code == 409 and again.headers["retry-after"] == "1"
    assert "still being handled" in again.json()["error"]["message"]

    [key] = redis.keys(keys.idempotency(None, "*"))
    redis.pexpire(key, 1)  # PENDING_TTL_S has passed
    time.sleep(0.05)
    taken = submit_txt2img(client)
    assert taken.status_code == 202 and "idempotent-replayed" not in taken.headers
    assert queued(redis) == [taken.json()["id"]]
    value, ttl = record(redis, keys)
    assert value.endswith(f":{taken.json()['id']}") and ttl > IDEMPOTENCY_TTL_S - 60
    assert submit_txt2img(client).json()["id"] == taken.json()["id"]


def test_a_request_that_died_after_its_enqueue_is_found_by_its_retry(
    client: TestClient, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue = Submitter.submit

    async def dies_after(self: Submitter, *args: Any) -> int:
        await enqueue(self, *args)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Submitter, "submit", dies_after)
        dies_submitting(settings)
    [job_id] = queued(redis)
    r = submit_txt2img(client)
    assert r.status_code == 202 and r.headers["idempotent-replayed"] == "true" and r.json()["id"] == job_id


def test_an_enqueue_whose_reply_was_lost_but_that_committed_is_202_and_keeps_its_inputs_and_key(
    client: TestClient, redis: Redis, keys: Keys, settings: Settings
) -> None:
    with enqueue_reply_lost(committed=True):
        r = submit(client)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert queued(redis) == [job_id]
    assert inputs(settings) == [Path(job_id, "input.png")]
    assert record(redis, keys)[0].endswith(f":{job_id}")  # final, written by the transaction itself
    again = submit(client)
    assert again.headers["idempotent-replayed"] == "true" and again.json()["id"] == job_id
    assert queued(redis) == [job_id] and inputs(settings) == [Path(job_id, "input.png")]


def test_an_enqueue_that_surely_did_not_commit_is_503_and_undoes_everything(
    client: TestClient, redis: Redis, keys: Keys, settings: Settings
) -> None:
    with enqueue_reply_lost(committed=False):
        r = submit(client)
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable" and "retry-after" in r.headers
    assert queued(redis) == [] and inputs(settings) == [] and redis.keys(keys.idempotency(None, "*")) == []
    assert submit(client).status_code == 202


def test_an_enqueue_nobody_can_look_up_is_503_and_keeps_what_the_job_may_need(
    settings: Settings, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis goes away after the commit: the job exists, so its inputs, its key and its owner's slot stay, and
    the retry (once Redis is back) replays it instead of queuing a second job."""
    from tests.api.test_auth import ALICE, with_keys

    with TestClient(create_app(with_keys(settings, max_queued_per_key=5))) as client:
        with enqueue_reply_lost(committed=True, lookups_fail=True):
            r = client.post("/v1/img2img", json=IMG2IMG, headers={"Idempotency-Key": "k", **ALICE})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        [job_id] = queued(redis)
        assert f"GET /v1/jobs/{job_id}" in r.json()["error"]["message"]
        assert inputs(settings) == [Path(job_id, "input.png")]
        assert redis.zrange(keys.owner_queued("alice"), 0, -1) == [job_id.encode()]
        again = client.post("/v1/img2img", json=IMG2IMG, headers={"Idempotency-Key": "k", **ALICE})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == job_id and queued(redis) == [job_id]
