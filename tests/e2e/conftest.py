"""Real processes for end-to-end tests: `sdqueue api` and `sdqueue worker` as subprocesses on a test Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import weights

    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    weights.save_random_checkpoint(path, *weights.tiny_configs())
    return path


class Service:
    """One API process and any number of worker processes sharing a Redis and a data directory."""

    def __init__(self, redis_url: str, workdir: Path, checkpoint: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.env = {
            **os.environ,
            "SDQ_REDIS_URL": redis_url,
            "SDQ_DATA_DIR": str(self.data_dir),
            "SDQ_PUBLIC_URL": self.url,
            "SDQ_CHECKPOINT": str(checkpoint),
            "SDQ_DEVICE": "cpu",
            # fp32 everywhere: the same pixels on every CPU, whether or not it has a native bf16 path.
            "SDQ_DTYPE": "float32",
            "SDQ_HEARTBEAT_S": "1",  # a killed worker's job is rerun within seconds
            "SDQ_WORKER_METRICS_PORT": "0",
            "SDQ_LOG_LEVEL": "INFO",
        }
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", "sdqueue", *args], cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_api(self) -> subprocess.Popen[bytes]:
        proc = self._start("api", "api", "--port", str(self.port))
        self.wait_for(lambda: self._get_ok("/healthz"), 30, "the API to answer /healthz")
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        return self._start("worker", "worker")

    def start_webhooks(self) -> subprocess.Popen[bytes]:
        return self._start("webhooks", "webhooks")

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_for(lambda: self._get_ok("/readyz"), timeout, "/readyz (a live worker)")

    def _get_ok(self, path: str) -> bool:
        try:
            return self.http.get(path).status_code == 200
        except httpx.HTTPError:
            return False

    def submit(self, **params: Any) -> dict[str, Any]:
        r = self.http.post("/v1/txt2img", json=params)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def wait_job(self, job_id: str, timeout: float = 60, status: str = "succeeded") -> dict[str, Any]:
        job: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal job
            job = self.job(job_id)
            return job["status"] == status or job["status"] in ("failed", "canceled")

        self.wait_for(reached, timeout, f"job {job_id} to be {status}")
        assert job["status"] == status, f"{job}\n{self.logs()}"
        return job

    def wait_for(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            dead = [(name, p.returncode) for name, p in self.procs if p.poll() is not None and p.returncode != -9]
            assert not dead, f"process exited while waiting for {what}: {dead}\n{self.logs()}"
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}\n{self.logs()}"
            time.sleep(0.1)

    def image_files(self) -> list[Path]:
        root = self.data_dir / "images"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        self.http.close()
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def service(redis_url: str, tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:
    svc = Service(redis_url, tmp_path, tiny_checkpoint)
    yield svc
    svc.stop()
