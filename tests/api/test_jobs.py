"""Reading and canceling jobs, with the worker's side of the contract written the way a worker writes it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result

from core.queue_stats import record_pipeline_call
from core.queues import Keys

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "seed": 7}


@pytest.fixture
def job_id(client: TestClient) -> str:
    return str(client.post("/v1/txt2img", json={**TINY, "n": 2}).json()["id"])


def start(redis: Redis, job_id: str, **meta: Any) -> Job:
    """What a worker does when it takes a job into a batch."""
    job = Job.fetch(job_id, connection=redis)
    Queue(job.origin, connection=redis).remove(job_id)
    job.set_status(JobStatus.STARTED)
    job.meta.update(meta)
    job.save_meta()
    return job


def test_unknown_job_is_404(client: TestClient, redis: Redis) -> None:
    assert client.get("/v1/jobs/0123456789abcdef").status_code == 404
    assert client.get("/v1/jobs/not:an:rq:id").status_code == 404
    Queue("someone-else", connection=redis).enqueue("os.getcwd", job_id="foreign")  # not an sdqueue job
    assert client.get("/v1/jobs/foreign").status_code == 404


def test_running_job_shows_progress_and_start_time(client: TestClient, redis: Redis, job_id: str) -> None:
    started = datetime.now(timezone.utc)
    start(redis, job_id, started_at=started.isoformat(), progress={"step": 2, "total": 4, "percent": 50.0,
                                                                  "eta_seconds": 0.5})
    job = client.get(f"/v1/jobs/{job_id}").json()

    assert job["status"] == "running"
    assert job["progress"] == {"step": 2, "total": 4, "percent": 50.0, "eta_seconds": 0.5}
    assert job["queue_position"] is None
    assert datetime.fromisoformat(job["started_at"]) == started
    assert job["timings"]["queue_seconds"] >= 0 and job["timings"]["run_seconds"] is None


def test_succeeded_job_lists_image_urls_seeds_and_timings(client: TestClient, redis: Redis, job_id: str) -> None:
    job = start(redis, job_id, started_at=datetime.now(timezone.utc).isoformat())
    images = [{"key": f"{job_id}/{i}.png", "seed": 7 + i, "width": 64, "height": 64, "content_type": "image/png"}
              for i in range(2)]
    value = {"images": images, "warnings": ["prompt truncated to 77 CLIP tokens"], "timings": {"run_seconds": 1.25}}
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value=value)
    job.set_status(JobStatus.FINISHED)

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["status"] == "succeeded"
    assert body["seeds"] == [7, 8]
    assert [i["url"] for i in body["images"]] == [f"http://api.example/v1/images/{job_id}/{i}.png" for i in range(2)]
    assert [i["seed"] for i in body["images"]] == [7, 8]
    assert body["warnings"] == ["prompt truncated to 77 CLIP tokens"]
    assert body["timings"]["run_seconds"] == 1.25
    assert body["timings"]["total_seconds"] >= body["timings"]["queue_seconds"] >= 0
    assert body["progress"]["percent"] == 100.0
    assert body["finished_at"] is not None and body["error"] is None


def test_failed_job_reports_the_workers_reason(client: TestClient, redis: Redis, job_id: str) -> None:
    job = start(redis, job_id, error={"type": "ValueError", "message": "prompt is empty after tokenization"})
    Result.create(job, Result.Type.FAILED, ttl=600, exc_string="Traceback ...\nValueError: prompt is empty")
    job.set_status(JobStatus.FAILED)

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["status"] == "failed"
    assert body["error"] == {"type": "ValueError", "message": "prompt is empty after tokenization"}
    assert body["images"] == []


def test_failed_job_without_a_reason_shows_rqs_last_line(client: TestClient, redis: Redis, job_id: str) -> None:
    job = start(redis, job_id)
    Result.create(job, Result.Type.FAILED, ttl=600, exc_string="Moved to FailedJobRegistry, due to AbandonedJobError")
    job.set_status(JobStatus.FAILED)

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["error"] == {"type": "WorkerError", "message": "Moved to FailedJobRegistry, due to AbandonedJobError"}


def test_cancel_queued_job_removes_it_from_the_queue(client: TestClient, redis: Redis, keys: Keys,
                                                      job_id: str) -> None:
    r = client.post(f"/v1/jobs/{job_id}/cancel")

    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert Queue("sdq-normal", connection=redis).job_ids == []
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # canceling twice is harmless
    assert redis.smembers(keys.cancel_requests()) == set()


def test_cancel_running_job_asks_the_worker(client: TestClient, redis: Redis, keys: Keys, job_id: str) -> None:
    start(redis, job_id)
    events = redis.pubsub(ignore_subscribe_messages=True)
    events.subscribe(keys.events(job_id))
    events.get_message(timeout=1)

    r = client.post(f"/v1/jobs/{job_id}/cancel")

    assert r.status_code == 202 and r.json()["status"] == "running"
    assert redis.smembers(keys.cancel_requests()) == {job_id.encode()}
    message = events.get_message(timeout=2)
    assert message is not None
    assert json.loads(message["data"]) == {"event": "cancel_requested", "job_id": job_id, "data": {}}
    events.close()


def test_cancel_finished_job_is_409_and_unknown_is_404(client: TestClient, redis: Redis, job_id: str) -> None:
    job = start(redis, job_id)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value={"images": []})
    job.set_status(JobStatus.FINISHED)

    r = client.post(f"/v1/jobs/{job_id}/cancel")

    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict"
    assert "already succeeded" in r.json()["error"]["message"]
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_retried_job_waiting_again_is_queued(client: TestClient, redis: Redis, job_id: str) -> None:
    """A job whose worker died is put back on its queue by RQ: it reads as queued again, at the front."""
    job = start(redis, job_id, started_at=(datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat())
    job.set_status(JobStatus.QUEUED)
    Queue(job.origin, connection=redis).push_job_id(job_id, at_front=True)

    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "queued" and body["queue_position"] == 0


def test_queued_job_gets_an_eta_once_workers_have_recorded_timings(
    client: TestClient, redis: Redis, keys: Keys
) -> None:
    first = client.post("/v1/txt2img", json=TINY).json()
    second = client.post("/v1/txt2img", json={**TINY, "n": 2}).json()
    assert client.get(f"/v1/jobs/{second['id']}").json()["progress"]["eta_seconds"] is None

    record_pipeline_call(redis, keys, seconds=3.0, images=2, jobs=2)  # 1.5 s per image, 1 image per job

    assert client.get(f"/v1/jobs/{first['id']}").json()["progress"]["eta_seconds"] == 1.5
    assert client.get(f"/v1/jobs/{second['id']}").json()["progress"]["eta_seconds"] == 4.5  # 1 job ahead + 2 images
