"""`Idempotency-Key` and `Prefer: wait=N` on submit, on a real Redis (the worker side written as it writes it)."""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result

from api.intake import IDEMPOTENCY_TTL_S, MAX_WAIT_S, parse_wait
from api.main import create_app
from core import eventlog
from core.queues import Keys
from core.settings import Settings

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "seed": 7}


def post(client: TestClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/v1/txt2img", json=body, headers=headers)


def finish(redis: Redis, keys: Keys, job_id: str) -> None:
    """What a worker does when a job succeeds: status and result first, then the terminal event."""
    job = Job.fetch(job_id, connection=redis)
    Queue(job.origin, connection=redis).remove(job_id)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value={"images": []})
    job.set_status(JobStatus.FINISHED)
    eventlog.record(redis, keys, job_id, eventlog.message("succeeded", job_id, {"images": []}))


def test_same_key_and_body_returns_the_first_job(client: TestClient, redis: Redis, keys: Keys) -> None:
    first = post(client, TINY, **{"Idempotency-Key": "order-42"})
    again = post(client, TINY, **{"Idempotency-Key": "order-42"})

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.headers["location"] == f"/v1/jobs/{first.json()['id']}"
    assert Queue("sdq-normal", connection=redis).job_ids == [first.json()["id"]]
    [record] = redis.keys(keys.idempotency(None, "*"))
    assert IDEMPOTENCY_TTL_S - 5 < redis.ttl(record) <= IDEMPOTENCY_TTL_S
    assert post(client, TINY, **{"Idempotency-Key": "order-43"}).json()["id"] != first.json()["id"]


def test_same_key_with_another_body_is_409(client: TestClient, redis: Redis) -> None:
    post(client, TINY, **{"Idempotency-Key": "order-42"})
    r = post(client, {**TINY, "steps": 5}, **{"Idempotency-Key": "order-42"})

    assert r.status_code == 409
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("idempotency_conflict", "Idempotency-Key")
    assert "different request body" in error["message"]
    assert len(Queue("sdq-normal", connection=redis)) == 1


def test_a_key_refused_by_a_limit_can_be_used_again(settings: Settings, redis: Redis) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_queued_jobs": 1}))) as client:
        blocker = post(client, {**TINY, "seed": 1}).json()
        assert post(client, TINY, **{"Idempotency-Key": "k"}).status_code == 503
        client.post(f"/v1/jobs/{blocker['id']}/cancel")
        r = post(client, TINY, **{"Idempotency-Key": "k"})
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers


def test_prefer_wait_returns_the_finished_job_with_200(client: TestClient, redis: Redis, keys: Keys) -> None:
    def worker() -> None:
        for _ in range(100):  # wait for the job to be queued, then finish it
            if ids := Queue("sdq-normal", connection=redis).job_ids:
                time.sleep(0.3)
                finish(redis, keys, ids[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=worker)
    thread.start()
    start = time.monotonic()
    r = post(client, TINY, Prefer="respond-async, wait=10")
    elapsed = time.monotonic() - start
    thread.join()

    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    assert r.headers["preference-applied"] == "wait=10"
    assert 0.3 <= elapsed < 5


def test_prefer_wait_gives_202_when_the_job_is_not_done_in_time(client: TestClient) -> None:
    start = time.monotonic()
    r = post(client, TINY, Prefer="wait=1")

    assert 1.0 <= time.monotonic() - start < 4
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["preference-applied"] == "wait=1"
    assert "preference-applied" not in post(client, TINY).headers


def test_replay_of_a_finished_job_with_prefer_wait_answers_200_at_once(client: TestClient, redis: Redis,
                                                                       keys: Keys) -> None:
    job = post(client, TINY, **{"Idempotency-Key": "k"}).json()
    finish(redis, keys, job["id"])
    start = time.monotonic()
    r = post(client, TINY, **{"Idempotency-Key": "k", "Prefer": "wait=30"})
    assert time.monotonic() - start < 2
    assert r.status_code == 200 and r.json()["id"] == job["id"] and r.json()["status"] == "succeeded"


def test_prefer_header_parsing() -> None:
    assert parse_wait("wait=5") == 5
    assert parse_wait("respond-async, wait=12") == 12
    assert parse_wait('wait="3"; foo=bar') == 3
    assert parse_wait("WAIT=1000") == MAX_WAIT_S
    for ignored in (None, "", "respond-async", "wait=", "wait=-1", "wait=1.5", "wait=soon"):
        assert parse_wait(ignored) is None
