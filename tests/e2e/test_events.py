"""Following jobs on real processes: Server-Sent Events from a real worker (with a client that drops and
reconnects), and `Prefer: wait` returning the finished job."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Service
from tests.redis_server import RedisServer

# Enough steps to see several progress events (sent at most 4 times a second), small enough to stay quick.
JOB = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 12, "sampler": "euler"}
Frame = dict[str, Any]


@pytest.fixture(scope="module")
def running(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
            tiny_checkpoint: Path) -> Iterator[Service]:
    """One API and one worker for the module's tests (a worker start loads the model: seconds)."""
    svc = Service(redis_server.url, tmp_path_factory.mktemp("events"), tiny_checkpoint)
    svc.start_api()
    svc.start_worker()
    svc.wait_ready()
    yield svc
    svc.stop()


def follow(service: Service, job_id: str, last_event_id: str | None = None,
           until: Callable[[Frame], bool] | None = None) -> list[Frame]:
    """Read the job's event stream until it ends, or until `until(frame)` is true, then hang up."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    frames: list[Frame] = []
    fields: dict[str, str] = {}
    with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                continue
            if "event" in fields:
                frames.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
                if until is not None and until(frames[-1]):
                    break
            fields = {}
    return frames


def order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def test_a_client_sees_progress_and_the_finished_job(running: Service) -> None:
    job = running.submit(**JOB, seed=1)
    frames = follow(running, job["id"])

    names = [f["event"] for f in frames]
    assert names[-1] == "succeeded" and "running" in names, names
    steps = [f["data"]["step"] for f in frames if f["event"] == "progress"]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] == JOB["steps"], steps
    final = frames[-1]["data"]
    assert final["status"] == "succeeded" and len(final["images"]) == 1
    assert running.http.get(final["images"][0]["url"]).status_code == 200
    stream_ids = [order(f["id"]) for f in frames if f["event"] != "queued"]
    assert stream_ids == sorted(stream_ids) and len(set(stream_ids)) == len(stream_ids)


def test_a_client_that_reconnects_mid_job_gets_the_rest_and_the_end(running: Service) -> None:
    job = running.submit(**JOB, seed=2)
    first = follow(running, job["id"], until=lambda f: f["event"] == "progress")  # then the client hangs up
    seen = first[-1]
    assert seen["event"] == "progress" and seen["data"]["step"] < JOB["steps"]

    rest = follow(running, job["id"], last_event_id=seen["id"])

    assert rest[-1]["event"] == "succeeded" and rest[-1]["data"]["status"] == "succeeded"
    assert all(order(f["id"]) > order(seen["id"]) for f in rest)  # nothing from before the reconnect again
    assert [f["event"] for f in rest].count("running") == 0
    steps = [f["data"]["step"] for f in rest if f["event"] == "progress"]
    assert all(step > seen["data"]["step"] for step in steps) and steps == sorted(steps)
    assert running.job(job["id"])["status"] == "succeeded"


def test_prefer_wait_returns_the_finished_job(running: Service) -> None:
    r = running.http.post("/v1/txt2img", json={**JOB, "steps": 2}, headers={"Prefer": "wait=60"}, timeout=90)

    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=60"
    body = r.json()
    assert body["status"] == "succeeded" and len(body["images"]) == 1
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"


def test_prefer_wait_gives_202_when_the_job_is_not_done_in_time(running: Service) -> None:
    # Big enough that no CPU finishes it within the 1 s wait (150 steps of 2 images at 256x256).
    slow = {**JOB, "steps": 150, "width": 256, "height": 256, "n": 2}
    r = running.http.post("/v1/txt2img", json=slow, headers={"Prefer": "wait=1"})

    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    assert r.headers["preference-applied"] == "wait=1"
    assert running.http.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code in (200, 202)
    running.wait_job(r.json()["id"], timeout=60, status="canceled")
