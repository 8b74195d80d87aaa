"""Worker test fixtures: a tiny checkpoint, job submission as the API does it, and worker processes.

Worker processes (``WorkerProcess``, ``Pool``) run ``python -m sdqueue worker`` (the real entry point) against a
redis-server (the session's, or a test module's own), with ``SDQ_HEARTBEAT_S=1`` so that crash recovery happens
within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq.job import Job, JobStatus

from core.jobs import GenerationParams, JobSpec
from core.jobstore import enqueue, new_job_spec
from core.queues import Keys
from core.settings import Settings, load_settings
from model.requests import GenerationRequest
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
# The pipeline promises batch invariance within 1/255 in float32; bf16 (the CPU default where it is fast) is looser.
DTYPE = "float32"
TERMINAL = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.weights import save_random_checkpoint, tiny_configs

    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors", *tiny_configs())


@pytest.fixture(scope="session")
def tiny_pipe(tiny_checkpoint: Path) -> Any:
    from model.pipeline import Pipeline

    return Pipeline.load(tiny_checkpoint, device="cpu", dtype=DTYPE)


def make_settings(redis_url: str, data_dir: Path, checkpoint: Path | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "checkpoint": checkpoint,
        "device": "cpu",
        "dtype": DTYPE,
        "heartbeat_s": 1,
        "worker_metrics_port": 0,
        "max_batch_images": 8,
        "batch_window_ms": 50,
        **overrides,
    }
    return load_settings(**values)


def submit(redis: Redis, settings: Settings, **params: Any) -> JobSpec:
    """Enqueue a txt2img job exactly as the API does; ``seed`` defaults to 1 for reproducible pixels."""
    params.setdefault("prompt", "a photo of a cat")
    params.setdefault("width", 64)
    params.setdefault("height", 64)
    params.setdefault("steps", 3)
    params.setdefault("seed", 1)
    spec = new_job_spec(GenerationParams(**params))
    enqueue(redis, settings, spec)
    return spec


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def status(redis: Redis, job_id: str) -> JobStatus:
    return Job.fetch(job_id, connection=redis).get_status()


def wait_terminal(redis: Redis, job_ids: list[str], timeout: float) -> float:
    return wait_for(lambda: all(status(redis, j) in TERMINAL for j in job_ids), timeout, f"{len(job_ids)} jobs to end")


def logged_events(redis: Redis, job_id: str, keys: Keys | None = None) -> list[dict[str, Any]]:
    """The job's events as its event log stream holds them, each with ``at``: the Redis time it was written (s)."""
    events = []
    for entry_id, fields in redis.xrange((keys or Keys()).event_log(job_id)):
        event = json.loads(fields[b"message"])
        event["at"] = int(entry_id.split(b"-")[0]) / 1000
        events.append(event)
    return events


def stored_images(data_dir: Path, job_id: str) -> list[np.ndarray]:
    files = sorted((data_dir / "images" / job_id).glob("*.png"), key=lambda p: int(p.stem))
    return [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files]


def solo_images(pipe: Any, spec: JobSpec) -> list[np.ndarray]:
    """The images the job gives when it runs alone, in this process."""
    from worker.runner import to_request

    request: GenerationRequest = to_request(spec)
    [result] = pipe.generate([request])
    return [np.asarray(image.convert("RGB"), dtype=np.int16) for image in result.images]


def max_pixel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b), (len(a), len(b))
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


class WorkerProcess:
    """``python -m sdqueue worker`` with its log in a file; ``metrics()`` scrapes its /metrics page."""

    def __init__(self, settings: Settings, checkpoint: Path, logdir: Path, index: int) -> None:
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "SDQ_REDIS_URL": settings.redis_url,
            "SDQ_DATA_DIR": str(settings.data_dir),
            "SDQ_CHECKPOINT": str(checkpoint),
            "SDQ_DEVICE": "cpu",
            "SDQ_DTYPE": settings.dtype,
            "SDQ_HEARTBEAT_S": str(settings.heartbeat_s),
            "SDQ_MAX_BATCH_IMAGES": str(settings.max_batch_images),
            "SDQ_BATCH_WINDOW_MS": str(settings.batch_window_ms),
            "SDQ_WORKER_METRICS_PORT": str(self.metrics_port),
            "SDQ_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # two workers on a small machine: no oversubscription
        }
        self.log_path = logdir / f"worker-{index}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sdqueue", "worker"], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.name: str | None = None

    def wait_registered(self, redis: Redis, timeout: float = 90) -> None:
        from rq.worker import Worker

        def registered() -> bool:
            assert self.proc.poll() is None, f"worker exited early:\n{self.log()}"
            for worker in Worker.all(connection=redis):
                if worker.pid == self.proc.pid:
                    self.name = worker.name
                    return True
            return False

        wait_for(registered, timeout, "the worker to register with RQ")

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Pool:
    """The module's worker processes; ``ensure(n)`` tops them up to ``n`` live, registered workers."""

    def __init__(self, redis: Redis, settings: Settings, checkpoint: Path, logdir: Path) -> None:
        self.redis, self.settings, self.checkpoint, self.logdir = redis, settings, checkpoint, logdir
        self.workers: list[WorkerProcess] = []

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc.poll() is None]

    def ensure(self, n: int) -> list[WorkerProcess]:
        new = [WorkerProcess(self.settings, self.checkpoint, self.logdir, len(self.workers) + i)
               for i in range(n - len(self.alive()))]
        self.workers += new
        for worker in new:
            worker.wait_registered(self.redis)
        return self.alive()

    def exactly(self, n: int) -> list[WorkerProcess]:
        """Exactly ``n`` live workers, so that no other worker takes a job a test wants to keep queued."""
        for worker in self.alive()[n:]:
            worker.stop()
        return self.ensure(n)

    def by_name(self, name: str) -> WorkerProcess:
        return next(w for w in self.workers if w.name == name)

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()[-4000:]}" for w in self.workers)


def image_count(pool: Pool, spec: JobSpec) -> int:
    return len(list((pool.settings.data_dir / "images" / spec.id).glob("*.png")))


def wait_running(pool: Pool, specs: list[JobSpec], timeout: float = 60) -> set[str]:
    """Wait until every job of ``specs`` runs (denoising has begun); returns the names of the workers running them."""
    def running() -> bool:
        jobs = [Job.fetch(s.id, connection=pool.redis) for s in specs]
        return all(j.get_status() == JobStatus.STARTED and "progress" in j.meta for j in jobs)

    wait_for(running, timeout, "the batch to run")
    return {Job.fetch(s.id, connection=pool.redis).worker_name or "" for s in specs}


def wait_any_running(pool: Pool, specs: list[JobSpec], timeout: float = 60) -> dict[str, str]:
    """Wait until some job of ``specs`` runs (denoising has begun); returns {job id: worker name} of those running
    then. With two idle workers one may take a single job and end it before the other's batch begins."""
    found: dict[str, str] = {}

    def running() -> bool:
        jobs = [Job.fetch(s.id, connection=pool.redis) for s in specs]
        found.clear()
        found.update({j.id: j.worker_name or "" for j in jobs
                      if j.get_status() == JobStatus.STARTED and "progress" in j.meta})
        return bool(found)

    wait_for(running, timeout, "a job to run")
    return dict(found)


@pytest.fixture
def keys() -> Keys:
    return Keys("sdq")


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()
