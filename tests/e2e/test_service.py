"""The whole path on real processes: HTTP -> API -> Redis/RQ -> worker -> local storage -> HTTP download."""

from __future__ import annotations

import io
import os
import signal
import socket

import numpy as np
import psutil
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.results import Result

from tests.e2e.conftest import Service

SMALL = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 3, "sampler": "euler"}


def download(service: Service, url: str) -> Image.Image:
    r = service.http.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    image.load()
    return image


def test_jobs_run_end_to_end_and_a_seed_gives_the_same_pixels(service: Service) -> None:
    service.start_api()
    service.start_worker()
    service.wait_ready()

    first = service.submit(**SMALL, seed=42)
    again = service.submit(**SMALL, seed=42)
    other = service.submit(**{**SMALL, "width": 96}, seed=7, n=2)
    jobs = [service.wait_job(j["id"]) for j in (first, again, other)]

    images = [[download(service, i["url"]) for i in job["images"]] for job in jobs]
    assert [len(i) for i in images] == [1, 1, 2]
    for image in (images[0][0], images[1][0]):
        assert (image.size, image.mode) == ((64, 64), "RGB")
    assert [(i.size, i.mode) for i in images[2]] == [((96, 64), "RGB")] * 2
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(images[1][0]))
    assert not np.array_equal(np.asarray(images[2][0]), np.asarray(images[2][1]))  # seeds 7 and 8
    assert [i["seed"] for i in jobs[2]["images"]] == [7, 8] == jobs[2]["seeds"]
    assert "parameters" in images[0][0].info  # generation parameters travel with the file
    for job in jobs:
        assert job["progress"]["percent"] == 100.0
        assert job["timings"]["run_seconds"] > 0 and job["timings"]["total_seconds"] >= job["timings"]["run_seconds"]
    assert len(service.image_files()) == 4


def test_api_process_has_no_torch_loaded(service: Service) -> None:
    api = service.start_api()
    assert service.http.get("/v1/jobs/0123").status_code == 404
    mapped = [m.path for m in psutil.Process(api.pid).memory_maps()]
    assert mapped and not [p for p in mapped if "torch" in p]


def test_literal_dot_dot_over_a_real_socket_is_refused(service: Service) -> None:
    """uvicorn hands the path to the app without collapsing '..'; the route must refuse it."""
    service.start_api()
    (service.data_dir / "images").mkdir(parents=True)
    (service.data_dir / "secret.txt").write_text("do not serve")
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as s:
        s.sendall(b"GET /v1/images/../secret.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.split(b" ")[1] in (b"400", b"404")
    assert b"do not serve" not in reply


def test_job_of_a_killed_worker_is_rerun_by_the_next_worker(service: Service, redis_url: str) -> None:
    service.start_api()
    doomed = service.start_worker()
    service.wait_ready()
    # long enough to be killed mid-run on any CPU: 150 steps (the API maximum) at 128x128
    job = service.submit(**{**SMALL, "steps": 150, "width": 128, "height": 128}, seed=3)

    service.wait_for(lambda: service.job(job["id"])["progress"]["step"] >= 2, 60, "the slow job to be running")
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert service.job(job["id"])["status"] == "running"  # nobody has noticed yet
    service.start_worker()

    done = service.wait_job(job["id"], timeout=90)

    assert len(done["images"]) == 1
    files = service.image_files()
    assert [f.relative_to(service.data_dir / "images").as_posix() for f in files] == [f"{job['id']}/0.png"]
    rq_job = Job.fetch(job["id"], connection=Redis.from_url(redis_url))
    successes = [r for r in rq_job.results() if r.type == Result.Type.SUCCESSFUL]
    assert len(successes) == 1
    assert download(service, done["images"][0]["url"]).size == (128, 128)
