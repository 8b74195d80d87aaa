"""`make run` (and `sdqueue dev`) as a user runs them: start, wait until ready, make an image, stop, nothing left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.e2e.conftest import ROOT
from tests.redis_server import free_port

JOB = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2}


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

        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        make.wait(60)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    assert_all_gone(family)
    output = log.read_text()
    assert "RANDOM weights" in output and "SDQ_CHECKPOINT" in output
    assert (tmp_path / "data" / "demo" / "sdqueue-demo.safetensors").is_file()
    assert any((tmp_path / "data" / "redis").rglob("*.aof")), "Redis kept no append-only file"


def test_dev_uses_the_given_redis_and_sigterm_stops_its_children(
    tmp_path: Path, redis_url: str, tiny_checkpoint: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(SDQ_DATA_DIR=str(tmp_path / "data"), SDQ_REDIS_URL=redis_url, SDQ_CHECKPOINT=str(tiny_checkpoint),
               SDQ_WORKER_METRICS_PORT="0")
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
