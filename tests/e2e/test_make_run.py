"""`make run` (and `sdqueue dev`) as a user runs them: start, wait until ready, make an image, stop, nothing left; and
Ctrl-C in the middle of a batch: once (the batch finishes, then everything stops) and twice (everything stops now)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from redis import Redis
from rq.job import Job, JobStatus

from tests.e2e.conftest import ROOT
from tests.redis_server import free_port

JOB = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2}
LONG_JOB = {"prompt": "a photo of a cat", "width": 128, "height": 128, "steps": 150}
FINISHING = "the worker is finishing its running batch first (Ctrl-C again stops at once)"
FALSE_TIMEOUT = "did not stop within"


def wait_until(check: object, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert proc.poll() is None, f"exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-5000:]}"
        time.sleep(0.2)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def make_an_image(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        job = http.post("/v1/txt2img", json=JOB).json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = http.get(f"/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        image = http.get(job["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def assert_all_gone(procs: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 10
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"


def listening(procs: list[psutil.Process]) -> set[tuple[str, str]]:
    """(process, address) of every TCP listener of these processes."""
    return {(" ".join(p.cmdline()[-2:]), c.laddr.ip) for p in procs for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def test_make_run_serves_an_image_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env["SDQ_DATA_DIR"] = str(tmp_path / "data")  # no SDQ_CHECKPOINT: the demo checkpoint is created
    log = tmp_path / "make-run.log"
    # The environment running the tests is the installed one: `-o` tells make its install stamp is up to date.
    venv = Path(sys.prefix)
    command = ["make", "-o", str(venv / ".installed"), "run", f"VENV={venv}", f"PORT={port}"]
    with open(log, "wb") as out:
        make = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own terminal-like process group, for Ctrl-C
    try:
        wait_until(lambda: ready(url), 180, "/readyz", make, log)
        family = psutil.Process(make.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert "redis-server" in names and "sdqueue api" in names and "sdqueue worker" in names, names
        assert "sdqueue webhooks" in names, names

        make_an_image(url)
        # Redis, the API and both metrics listeners: on loopback only.
        addresses = listening(family)
        assert {ip for _, ip in addresses} == {"127.0.0.1"}, addresses
        assert {name for name, _ in addresses} >= {"sdqueue worker", "sdqueue webhooks"}, addresses

        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        make.wait(60)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    assert_all_gone(family)
    output = log.read_text()
    assert "RANDOM weights" in output and "SDQ_CHECKPOINT" in output
    assert FALSE_TIMEOUT not in output and "Traceback" not in output, output[-5000:]
    assert (tmp_path / "data" / "demo" / "sdqueue-demo.safetensors").is_file()
    assert any((tmp_path / "data" / "redis").rglob("*.aof")), "Redis kept no append-only file"


def test_dev_uses_the_given_redis_and_sigterm_stops_its_children(
    tmp_path: Path, redis_url: str, tiny_checkpoint: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(SDQ_DATA_DIR=str(tmp_path / "data"), SDQ_REDIS_URL=redis_url, SDQ_CHECKPOINT=str(tiny_checkpoint),
               SDQ_WORKER_METRICS_PORT="0", SDQ_WEBHOOK_METRICS_PORT="0")
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen([sys.executable, "-m", "sdqueue", "dev", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ready(url), 120, "/readyz", dev, log)
        family = psutil.Process(dev.pid).children(recursive=True)
        assert not any("redis-server" in " ".join(p.cmdline()) for p in family)  # it used SDQ_REDIS_URL
        make_an_image(url)
        dev.terminate()
        assert dev.wait(60) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    assert_all_gone(family)
    assert "RANDOM weights" not in log.read_text()


class Dev:
    """`sdqueue dev` on the test Redis, in a session of its own as a terminal would run it, with its log in a file."""

    def __init__(self, tmp_path: Path, redis_url: str, checkpoint: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
        env.update(SDQ_DATA_DIR=str(tmp_path / "data"), SDQ_REDIS_URL=redis_url, SDQ_CHECKPOINT=str(checkpoint),
                   SDQ_DEVICE="cpu", SDQ_WORKER_METRICS_PORT="0", SDQ_WEBHOOK_METRICS_PORT="0")
        self.log = tmp_path / "dev.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sdqueue", "dev", "--port", self.url.rsplit(":", 1)[1]], cwd=ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_until(lambda: ready(self.url), 120, "/readyz", self.proc, self.log)
        self.family = psutil.Process(self.proc.pid).children(recursive=True)

    def child(self, command: str) -> psutil.Process:
        [proc] = [p for p in self.family if " ".join(p.cmdline()).endswith(f"sdqueue {command}")]
        return proc

    def running_job(self) -> str:
        """Submit a long job and wait until the worker runs it."""
        with httpx.Client(base_url=self.url, timeout=10) as http:
            job = http.post("/v1/txt2img", json=LONG_JOB).json()
            wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 60, "a running job",
                       self.proc, self.log)
        return str(job["id"])

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_ctrl_c_lets_the_running_batch_finish_then_stops(
    tmp_path: Path, redis_url: str, tiny_checkpoint: Path
) -> None:
    dev = Dev(tmp_path, redis_url, tiny_checkpoint)
    try:
        job_id = dev.running_job()
        worker = dev.child("worker")
        worker.suspend()  # holds the batch mid-way, however fast this machine is
        dev.ctrl_c()
        wait_until(lambda: FINISHING in dev.output(), 30, "the finishing message", dev.proc, dev.log)
        worker.resume()
        assert dev.proc.wait(300) == 0, dev.output()[-5000:]
    finally:
        dev.kill()
    assert_all_gone(dev.family)
    assert Job.fetch(job_id, connection=Redis.from_url(redis_url)).get_status() == JobStatus.FINISHED
    assert FALSE_TIMEOUT not in dev.output(), dev.output()[-5000:]


def test_a_second_ctrl_c_stops_everything_at_once(tmp_path: Path, redis_url: str, tiny_checkpoint: Path) -> None:
    dev = Dev(tmp_path, redis_url, tiny_checkpoint)
    try:
        dev.running_job()
        dev.child("worker").suspend()  # a batch that would not end by itself
        dev.ctrl_c()
        wait_until(lambda: FINISHING in dev.output(), 30, "the finishing message", dev.proc, dev.log)
        dev.ctrl_c()
        assert dev.proc.wait(30) == 130, dev.output()[-5000:]
    finally:
        dev.kill()
    assert_all_gone(dev.family)
    output = dev.output()
    assert "stopping at once" in output and FALSE_TIMEOUT not in output and "Traceback" not in output, output[-5000:]
