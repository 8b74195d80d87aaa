"""Reading and canceling jobs, with the worker's side of the contract written by RQ itself (tests/rq_worker_side.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core import jobstore
from core.queue_stats import record_pipeline_call
from core.queues import Keys
from core.settings import load_settings
from tests.rq_worker_side import take
from tests.worker.conftest import logged_events

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "seed": 7}
HOOK = "https://93.184.216.34/hook"  # a public address: accepted at submit; nothing is sent in these tests
SECRET = "whsec_" + "c2RxdWV1ZSB0ZXN0IHNpZ25pbmcga2V5IDMyIGJ5dGVz"


@pytest.fixture
def job_id(client: TestClient) -> str:
    return str(client.post("/v1/txt2img", json={**TINY, "n": 2}).json()["id"])


def test_unknown_job_is_404(client: TestClient, redis: Redis) -> None:
    assert client.get("/v1/jobs/0123456789abcdef").status_code == 404
    assert client.get("/v1/jobs/not:an:rq:id").status_code == 404
    Queue("someone-else", connection=redis).enqueue("os.getcwd", job_id="foreign")  # not an sdqueue job
    assert client.get("/v1/jobs/foreign").status_code == 404


def test_running_job_shows_progress_and_start_time(client: TestClient, redis: Redis, keys: Keys,
                                                   job_id: str) -> None:
    before = datetime.now(timezone.utc)
    job = take(redis, keys, job_id)
    job.progress(2, 4, eta_seconds=0.5)

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["status"] == "running"
    assert body["progress"] == {"step": 2, "total": 4, "percent": 50.0, "eta_seconds": 0.5}
    assert body["queue_position"] is None
    assert datetime.fromisoformat(body["started_at"]) == datetime.fromisoformat(job.job.meta["started_at"])
    assert before <= datetime.fromisoformat(body["started_at"]) <= datetime.now(timezone.utc)
    assert body["timings"]["queue_seconds"] >= 0 and body["timings"]["run_seconds"] is None


def test_succeeded_job_lists_image_urls_seeds_and_timings(client: TestClient, redis: Redis, keys: Keys,
                                                          job_id: str) -> None:
    images = [{"key": f"{job_id}/{i}.png", "seed": 7 + i, "width": 64, "height": 64, "content_type": "image/png"}
              for i in range(2)]
    take(redis, keys, job_id).succeed({"images": images, "warnings": ["prompt truncated to 77 CLIP tokens"],
                                       "timings": {"run_seconds": 1.25, "pipeline_seconds": 1.0}})

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


def test_failed_job_reports_the_workers_reason(client: TestClient, redis: Redis, keys: Keys, job_id: str) -> None:
    take(redis, keys, job_id).fail(ValueError("prompt is empty after tokenization"))

    body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["status"] == "failed"
    assert body["error"] == {"type": "ValueError", "message": "prompt is empty after tokenization"}
    assert body["images"] == [] and body["finished_at"] is not None


def test_a_job_whose_last_worker_died_shows_rqs_reason(redis_url: str, tmp_path: Path, redis: Redis,
                                                        keys: Keys) -> None:
    """No retries left: RQ's registry cleanup fails the job as abandoned, and its last line is the reason."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path / "data", job_retries=0)
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/txt2img", json=TINY).json()["id"]
        take(redis, keys, job_id).die()

        body = client.get(f"/v1/jobs/{job_id}").json()

    assert body["status"] == "failed"
    assert body["error"]["type"] == "WorkerError"
    assert body["error"]["message"].startswith("Moved to FailedJobRegistry, due to AbandonedJobError")


def test_cancel_queued_job_removes_it_from_the_queue(client: TestClient, redis: Redis, keys: Keys,
                                                      job_id: str) -> None:
    r = client.post(f"/v1/jobs/{job_id}/cancel")

    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert Queue("sdq-normal", connection=redis).job_ids == []
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # canceling twice is harmless
    assert redis.smembers(keys.cancel_requests()) == set()


def test_cancel_running_job_asks_the_worker(client: TestClient, redis: Redis, keys: Keys, job_id: str) -> None:
    take(redis, keys, job_id)

    r = client.post(f"/v1/jobs/{job_id}/cancel")

    # The client learns the job still runs: it stops after the current step, and its events end with `canceled`.
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["error"] is None
    assert r.json() == client.get(f"/v1/jobs/{job_id}").json()  # the job as GET shows it
    # The worker checks this set after every step.
    assert redis.smembers(keys.cancel_requests()) == {job_id.encode()}


class Died(Exception):
    """The API process dies here: nothing after this point runs."""


def completed_deliveries(redis: Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    kwargs = [Job.fetch(i, connection=redis).kwargs for i in Queue(keys.webhooks(), connection=redis).job_ids]
    return [k for k in kwargs if k["job_id"] == job_id and k["event"] == "completed"]


@pytest.fixture
def hooked(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """An API that sends webhooks (it has a signing secret)."""
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path / "data", public_url="http://api.example",
                             webhook_secret=SECRET)
    with TestClient(create_app(settings)) as c:
        yield c


def test_a_queued_cancel_lands_with_its_event_and_webhook_even_if_the_api_dies_right_after(
        hooked: TestClient, redis: Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    client = hooked
    job_id = client.post("/v1/txt2img", json={**TINY, "webhook": HOOK}).json()["id"]
    run_script = Redis.eval

    def script_then_die(self: Redis, script: str, *args: Any) -> Any:
        reply = run_script(self, script, *args)
        if script == jobstore._CANCEL_WAITING:
            raise Died("killed right after the cancel script")
        return reply

    monkeypatch.setattr(Redis, "eval", script_then_die)
    with contextlib.suppress(Died):
        client.post(f"/v1/jobs/{job_id}/cancel")
    monkeypatch.undo()

    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "canceled"
    assert [e["event"] for e in logged_events(redis, job_id, keys)] == ["canceled"]
    [delivery] = completed_deliveries(redis, keys, job_id)
    assert delivery["payload"] == view  # what GET answers once the cancel landed
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # a retried cancel adds nothing
    assert len(completed_deliveries(redis, keys, job_id)) == 1
    assert [e["event"] for e in logged_events(redis, job_id, keys)] == ["canceled"]


def test_a_cancel_that_finds_the_job_taken_queues_no_webhook(hooked: TestClient, redis: Redis, keys: Keys) -> None:
    client = hooked
    job_id = client.post("/v1/txt2img", json={**TINY, "webhook": HOOK}).json()["id"]
    take(redis, keys, job_id)

    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert completed_deliveries(redis, keys, job_id) == []  # the worker queues it with the job's end
    assert [e["event"] for e in logged_events(redis, job_id, keys)] == ["running"]


def test_cancel_finished_job_is_409_and_unknown_is_404(client: TestClient, redis: Redis, keys: Keys,
                                                       job_id: str) -> None:
    take(redis, keys, job_id).succeed({"images": [], "warnings": [], "timings": {"run_seconds": 0.5}})

    r = client.post(f"/v1/jobs/{job_id}/cancel")

    assert r.status_code == 409
    assert r.json() == {"error": {"type": "conflict", "message": f"job {job_id} already succeeded; nothing to cancel",
                                  "field": None}}
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    missing = client.post("/v1/jobs/nope/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_a_dead_workers_job_is_queued_again_behind_the_waiting_ones(client: TestClient, redis: Redis, keys: Keys,
                                                                    job_id: str) -> None:
    """RQ's registry cleanup re-enqueues a dead worker's job through its Retry: it reads as queued again, with a
    start time from its first run, at the back of its queue (RQ's Retry enqueues at the back)."""
    behind = client.post("/v1/txt2img", json=TINY).json()["id"]
    job = take(redis, keys, job_id)
    first_start = job.job.meta["started_at"]
    job.die()

    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "queued" and body["queue_position"] == 1
    assert client.get(f"/v1/jobs/{behind}").json()["queue_position"] == 0
    assert datetime.fromisoformat(body["started_at"]) == datetime.fromisoformat(first_start)
    assert Job.fetch(job_id, connection=redis).retries_left == 2  # one of its 3 retries used


def test_queued_job_gets_an_eta_once_workers_have_recorded_timings(
    client: TestClient, redis: Redis, keys: Keys
) -> None:
    first = client.post("/v1/txt2img", json=TINY).json()
    second = client.post("/v1/txt2img", json={**TINY, "n": 2}).json()
    assert client.get(f"/v1/jobs/{second['id']}").json()["progress"]["eta_seconds"] is None

    record_pipeline_call(redis, keys, seconds=3.0, images=2, jobs=2)  # 1.5 s per image, 1 image per job

    assert client.get(f"/v1/jobs/{first['id']}").json()["progress"]["eta_seconds"] == 1.5
    assert client.get(f"/v1/jobs/{second['id']}").json()["progress"]["eta_seconds"] == 4.5  # 1 job ahead + 2 images
