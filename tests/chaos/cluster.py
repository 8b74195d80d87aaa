"""The processes a drill runs and breaks: a redis-server with an append-only file, `sdqueue api`, `sdqueue worker`
processes on the tiny checkpoint, `sdqueue webhooks`, and a loopback webhook receiver.

Redis runs as operators run it (``appendonly yes``, ``appendfsync everysec``) in its own directory on its own port
(``tests.redis_server.RedisServer``), so a drill can SIGKILL it and start it again on the same port, where it
replays its append-only file, or fill it up. Every other
process is the real entry point (``python -m sdqueue ...``) with its log in a file. A process the drill kills on
purpose is marked ``killed``; any other process found dead at the end is a failure of the drill.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis.exceptions
from rq.worker import Worker

from tests.redis_server import RedisServer, free_port
from tests.webhook_receiver import WebhookReceiver

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# A whsec_ secret (base64 of a 32-byte key), so that receivers verify with the Standard Webhooks library.
SECRET = "whsec_" + base64.b64encode(b"sdqueue chaos drills signing key").decode()
QUEUES = ("sdq-high", "sdq-normal", "sdq-low")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took. Redis errors count as "not yet"."""
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except redis.exceptions.RedisError:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    """One ``sdqueue`` process. ``killed``: the drill killed it on purpose; ``retired``: stopped, or found dead and
    already reported, so no later check counts it again."""

    role: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str = ""  # the API's base URL
    killed: bool = False
    retired: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@dataclass(frozen=True)
class Config:
    workers: int = 2
    job_retries: int = 3  # SDQ_JOB_RETRIES: re-runs of a job whose worker died
    batch_window_ms: int = 200  # long enough that jobs submitted together share a batch
    max_batch_images: int = 8


class Cluster:
    """Redis, one API, ``config.workers`` workers and a webhook sender sharing a data directory; ``heal()`` brings
    back whatever a drill took away."""

    def __init__(self, workdir: Path, checkpoint: Path, config: Config | None = None) -> None:
        self.workdir = workdir
        self.config = config or Config()
        # As operators run it: an append-only file, fsynced every second (RedisServer.persist() for what must last).
        self.redis_server = RedisServer(workdir / "redis", appendfsync="everysec")
        self.redis = self.redis_server.client()
        self.receiver = WebhookReceiver()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.env = {
            **os.environ,
            "SDQ_REDIS_URL": self.redis_server.url,
            "SDQ_DATA_DIR": str(self.data_dir),
            "SDQ_PUBLIC_URL": self.url,
            "SDQ_CHECKPOINT": str(checkpoint),
            "SDQ_DEVICE": "cpu",
            "SDQ_DTYPE": "float32",
            "SDQ_HEARTBEAT_S": "1",  # leases of 3 s: a dead worker's jobs run again within seconds
            "SDQ_JOB_RETRIES": str(self.config.job_retries),
            "SDQ_BATCH_WINDOW_MS": str(self.config.batch_window_ms),
            "SDQ_MAX_BATCH_IMAGES": str(self.config.max_batch_images),
            "SDQ_WORKER_METRICS_PORT": "0",
            "SDQ_WEBHOOK_METRICS_PORT": "0",
            "SDQ_WEBHOOK_SECRET": SECRET,
            "SDQ_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
            "SDQ_WEBHOOK_RETRY_BASE_S": "0.2",
            "SDQ_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # several workers on a small machine: no oversubscription
        }
        self.procs: list[Proc] = []
        self._names: dict[str, Proc] = {}

    # processes -----------------------------------------------------------------------------------------------
    def spawn(self, role: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        path = self.workdir / f"{role}-{len(self.procs)}.log"
        with open(path, "wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "sdqueue", *args], cwd=ROOT,
                                     env={**self.env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(role, popen, path)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        """The webhook sender, the workers and the API, started together; returns once all are up."""
        self.start_webhooks()
        workers = [self.start_worker(wait=False) for _ in range(self.config.workers)]
        self.start_api()
        for worker in workers:
            self.wait_registered(worker)

    def start_api(self, port: int | None = None, extra_env: dict[str, str] | None = None) -> Proc:
        """An API process on the cluster's port (or ``port``), once it answers /healthz."""
        port = self.port if port is None else port
        proc = self.spawn("api", ["api", "--port", str(port)], extra_env)
        proc.url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.alive(), f"the API exited at start:\n{proc.tail()}"
            try:
                return httpx.get(f"{proc.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "the API to answer /healthz", every=0.1)
        return proc

    def start_webhooks(self) -> Proc:
        return self.spawn("webhooks", ["webhooks"])

    def start_worker(self, wait: bool = True) -> Proc:
        proc = self.spawn("worker", ["worker"])
        if wait:
            self.wait_registered(proc)
        return proc

    def wait_registered(self, proc: Proc, timeout: float = 120) -> None:
        def registered() -> bool:
            assert proc.alive(), f"worker {proc.pid} exited:\n{proc.tail()}"
            return any(w.pid == proc.pid for w in Worker.all(connection=self.redis))

        wait_until(registered, timeout, f"worker {proc.pid} to register", every=0.1)

    def wait_all_registered(self, timeout: float = 60) -> None:
        """Every live worker is registered with RQ (again, after an outage)."""
        for proc in self.live("worker"):
            self.wait_registered(proc, timeout)

    def kill(self, proc: Proc) -> None:
        """SIGKILL, on purpose."""
        proc.killed = True
        if proc.alive():
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)

    def retire(self, proc: Proc) -> None:
        """SIGTERM and wait: a process the drill no longer needs."""
        proc.retired = True
        if proc.alive():
            proc.popen.terminate()
            try:
                proc.popen.wait(60)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    def live(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role and p.alive()]

    def api(self) -> Proc | None:
        return next((p for p in self.live("api") if p.url == self.url), None)

    def worker_named(self, name: str) -> Proc | None:
        """The worker process RQ knows as ``name`` (``host.pid.suffix``)."""
        if name not in self._names:
            parts = name.rsplit(".", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            proc = next((p for p in self.procs if p.role == "worker" and p.pid == pid), None)
            if proc is None:
                return None
            self._names[name] = proc
        return self._names[name]

    def unexpected_deaths(self) -> list[Proc]:
        return [p for p in self.procs if not p.alive() and not p.killed and not p.retired]

    # recovery between drills -------------------------------------------------------------------------------
    def heal(self) -> None:
        """Redis up and with room, the API, the webhook sender and ``config.workers`` registered workers; processes
        found dead are retired (the drill that killed them has reported them)."""
        for proc in self.unexpected_deaths():
            log.warning("%s %d had died: %s", proc.role, proc.pid, proc.tail(500))
            proc.retired = True
        if not self.redis_server.alive():
            self.redis_server.start()
        self.redis_server.free()
        if self.api() is None:
            self.start_api()
        if not self.live("webhooks"):
            self.start_webhooks()
        new = [self.start_worker(wait=False) for _ in range(self.config.workers - len(self.live("worker")))]
        for proc in new:
            self.wait_registered(proc)
        self.wait_all_registered()

    def logs(self, chars: int = 3000, procs: list[Proc] | None = None) -> str:
        """The end of each process' log (default: every process')."""
        parts = [f"--- {p.log.name} ({p.role} {p.pid}, {'alive' if p.alive() else p.popen.returncode})\n"
                 f"{p.tail(chars)}" for p in (self.procs if procs is None else procs)]
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.terminate()
        for proc in self.procs:
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.receiver.stop()
        self.redis.close()
        self.redis_server.stop()
