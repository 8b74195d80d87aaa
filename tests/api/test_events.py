"""`GET /v1/jobs/{id}/events` over a real Redis, with the worker's records and events written as a worker does
(RQ's own records through its worker APIs: tests/rq_worker_side.py).

(The test client hands over a streamed body when the stream ends, so a thread plays the worker meanwhile. The
end-to-end tests follow a real worker with a real HTTP client, disconnects included.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from api.routes import events as events_route
from core.queues import Keys
from tests.rq_worker_side import TakenJob, take

TINY = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4}


def parse(text: str) -> list[dict[str, Any]]:
    """SSE frames -> [{"id", "event", "data"}] (comments and the retry hint skipped)."""
    frames = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in fields:
            frames.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
    return frames


def stream_id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class WorkerSide:
    """One job's worker side: RQ's own records and the worker's events (tests/rq_worker_side.py)."""

    def __init__(self, redis: Redis, keys: Keys, job_id: str) -> None:
        self.redis, self.keys, self.job_id = redis, keys, job_id
        self.taken: TakenJob | None = None

    def start(self) -> str:
        self.taken = take(self.redis, self.keys, self.job_id)
        return self.taken.running_event_id

    def progress(self, step: int) -> str:
        assert self.taken is not None, "start the job first"
        return self.taken.progress(step, 4)

    def succeed(self, *, announce: bool = True) -> None:
        assert self.taken is not None, "start the job first"
        self.taken.succeed({"images": [], "warnings": [], "timings": {"run_seconds": 0.1}}, announce=announce)


@pytest.fixture
def job(client: TestClient, redis: Redis, keys: Keys) -> WorkerSide:
    return WorkerSide(redis, keys, client.post("/v1/txt2img", json=TINY).json()["id"])


def wait_for_a_blocked_reader(redis: Redis, timeout_s: float = 30.0) -> None:
    """Until some connection is blocked in XREAD: the stream has read the job and sent what it had."""
    deadline = time.monotonic() + timeout_s
    while not any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in redis.client_list()):
        assert time.monotonic() < deadline, "the event stream never blocked on its log"
        time.sleep(0.02)


@pytest.fixture
def later(redis: Redis) -> Iterator[Callable[..., None]]:
    """Run functions in order in a thread once the stream waits on the job's log (while the test client waits on
    the stream), so what the stream saw first does not depend on how fast the machine is."""
    threads: list[threading.Thread] = []

    def run(*fns: Callable[[], object]) -> None:
        def in_order() -> None:
            wait_for_a_blocked_reader(redis)
            for fn in fns:
                fn()

        thread = threading.Thread(target=in_order)
        thread.start()
        threads.append(thread)

    yield run
    for thread in threads:
        thread.join()


def test_a_client_gets_queued_running_progress_and_the_finished_job(client: TestClient, job: WorkerSide,
                                                                     later: Any) -> None:
    later(job.start, lambda: job.progress(1), lambda: job.progress(2), job.succeed)
    r = client.get(f"/v1/jobs/{job.job_id}/events")

    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    frames = parse(r.text)
    assert [f["event"] for f in frames] == ["queued", "running", "progress", "progress", "succeeded"]
    assert frames[0]["data"]["status"] == "queued" and frames[0]["data"]["queue_position"] == 0
    assert [f["data"]["step"] for f in frames[2:4]] == [1, 2]
    ids = [stream_id(f["id"]) for f in frames[1:]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    final = frames[-1]["data"]
    assert final["id"] == job.job_id and final["status"] == "succeeded"  # the whole job, as GET shows it


def test_reconnecting_with_last_event_id_resumes_after_it(client: TestClient, job: WorkerSide,
                                                          later: Any) -> None:
    job.start()
    seen = job.progress(1)
    job.progress(2)
    later(lambda: job.progress(3), job.succeed)
    r = client.get(f"/v1/jobs/{job.job_id}/events", headers={"Last-Event-ID": seen})

    frames = parse(r.text)
    assert [(f["event"], f["data"].get("step")) for f in frames] == [
        ("progress", 2), ("progress", 3), ("succeeded", None)
    ]
    assert all(stream_id(f["id"]) > stream_id(seen) for f in frames)


def test_an_ended_job_gets_only_its_final_event(client: TestClient, job: WorkerSide) -> None:
    job.start()
    job.progress(4)
    job.succeed()
    for headers in ({}, {"Last-Event-ID": "0-0"}):
        frames = parse(client.get(f"/v1/jobs/{job.job_id}/events", headers=headers).text)
        assert [f["event"] for f in frames] == ["succeeded"]
        assert frames[0]["id"] == job.redis.xrevrange(job.keys.event_log(job.job_id), count=1)[0][0].decode()


def test_canceling_a_queued_job_ends_its_stream(client: TestClient, job: WorkerSide, later: Any) -> None:
    later(lambda: client.post(f"/v1/jobs/{job.job_id}/cancel"))
    frames = parse(client.get(f"/v1/jobs/{job.job_id}/events").text)

    assert [f["event"] for f in frames] == ["queued", "canceled"]
    assert frames[-1]["data"]["status"] == "canceled"


def test_a_job_that_ends_without_an_event_still_ends_the_stream(client: TestClient, job: WorkerSide, later: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_route, "POLL_S", 0.2)
    job.start()
    later(lambda: job.succeed(announce=False))
    frames = parse(client.get(f"/v1/jobs/{job.job_id}/events").text)

    assert [f["event"] for f in frames] == ["running", "succeeded"]
    assert frames[-1]["data"]["status"] == "succeeded"


def test_a_malformed_last_event_id_is_422(client: TestClient, job: WorkerSide) -> None:
    r = client.get(f"/v1/jobs/{job.job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "last-event-id"
