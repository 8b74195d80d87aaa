"""`sdqueue submit` end to end: a subprocess against real processes (redis-server, `sdqueue api`, `sdqueue worker`
on the tiny checkpoint). The files it writes, its exit codes and messages, --no-wait, Ctrl-C, and output without
control characters when it does not write to a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from core.jobs import Status
from sdqueue.client import Client
from tests.e2e.conftest import ROOT, Service
from tests.redis_server import RedisServer, free_port
from tests.sdqueue import live

QUICK = ["--width", "64", "--height", "64", "--steps", "8", "--sampler", "euler"]
# Long enough to be interrupted mid-run on a fast machine (each test cancels it).
SLOW = ["--width", "384", "--height", "384", "--steps", "150", "--n", "2", "--sampler", "euler"]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but tab and newline: \r, escape sequences, ...


@pytest.fixture(scope="module")
def running(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with live.service(redis_server.url, tmp_path_factory.mktemp("submit"), SDQ_LOG_FORMAT="json") as svc:
        yield svc


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def submit(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdqueue", "submit", *args], cwd=cwd, env=environment(**env),
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def start_submit(*args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "sdqueue", "submit", *args], cwd=cwd, env=environment(),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for_text(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while not (found := re.search(pattern, log.read_text(errors="replace"))):
        assert proc.poll() is None, f"exited ({proc.returncode}):\n{log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{log.read_text(errors='replace')}"
        time.sleep(0.1)
    return found


def wait_running(url: str, job_id: str, timeout: float = 60) -> None:
    """Until the API shows the job running: the plain progress lines come every few seconds, so the log alone
    cannot tell that the job is still mid-run."""
    deadline = time.monotonic() + timeout
    with Client(url) as client:
        while client.get(job_id).status is not Status.running:
            assert time.monotonic() < deadline, f"job {job_id} not running within {timeout} s"
            time.sleep(0.1)


def test_submit_writes_the_images_and_shows_progress_without_control_characters(
    running: Service, tmp_path: Path
) -> None:
    run = submit("a photo of a cat", "--server", running.url, *QUICK, "--seed", "5", "--n", "2", "-o", "cat.png",
                 cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for index, seed in enumerate((5, 6)):
        path = tmp_path / f"cat-{index}.png"
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(path)
        assert image.size == (64, 64) and f"Seed: {seed}" in image.info["parameters"]
        assert f"cat-{index}.png  seed={seed}" in run.stdout
    assert re.search(r"job [0-9a-f]{32} queued", run.stderr)
    assert re.search(r"steps: 100%\|#+\| 8/8 \[[0-9:]+<[0-9:]+, +[0-9.]+(it/s|s/it)\]", run.stderr), run.stderr
    assert not CONTROL.search(run.stderr + run.stdout), repr(run.stderr)


def test_a_refused_request_exits_2_with_the_api_message(running: Service, tmp_path: Path) -> None:
    run = submit("a cat", "--server", running.url, "--width", "513", cwd=tmp_path)
    assert run.returncode == 2
    assert "width must be a multiple of 8, got 513 (422 invalid_request, field width)" in run.stderr
    assert "Traceback" not in run.stderr and not list(tmp_path.iterdir())


def test_model_names_the_model_and_one_nobody_serves_is_refused(running: Service, tmp_path: Path) -> None:
    served = httpx.get(f"{running.url}/v1/models").json()["models"][0]["name"]
    run = submit("a cat", "--server", running.url, "--model", "absent", *QUICK, cwd=tmp_path)
    assert run.returncode == 2
    assert f"model 'absent' is not served; the live workers hold: {served}" in run.stderr
    run = submit("a cat", "--server", running.url, "--model", served, "--no-wait", *QUICK, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with Client(running.url) as client:
        assert client.wait(run.stdout.strip(), timeout=60).params.model == served


def test_a_server_that_does_not_answer_exits_1(tmp_path: Path) -> None:
    run = submit("a cat", *QUICK, cwd=tmp_path, SDQ_SERVER=f"http://127.0.0.1:{free_port()}")
    assert run.returncode == 1
    assert "sdqueue submit: POST http://127.0.0.1:" in run.stderr and "no answer" in run.stderr
    assert "Traceback" not in run.stderr


def test_no_wait_prints_the_job_id_and_reads_the_server_from_the_environment(running: Service, tmp_path: Path) -> None:
    run = submit("a cat for later", "--no-wait", *QUICK, cwd=tmp_path, SDQ_SERVER=running.url)
    assert run.returncode == 0, run.stderr
    job_id = run.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    with Client(running.url) as client:
        assert client.wait(job_id, timeout=60).params.prompt == "a cat for later"
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_job_canceled_meanwhile_exits_1_naming_it(running: Service, tmp_path: Path) -> None:
    log = tmp_path / "submit.log"
    proc = start_submit("a doomed cat", "--server", running.url, *SLOW, cwd=tmp_path, log=log)
    job_id = wait_for_text(log, r"job ([0-9a-f]{32}) queued", proc).group(1)
    with Client(running.url) as client:
        client.cancel(job_id)
        assert proc.wait(60) == 1
        assert client.get(job_id).status is Status.canceled
    assert f"sdqueue submit: job {job_id} canceled" in log.read_text()


def test_ctrl_c_with_cancel_on_interrupt_cancels_the_job(running: Service, tmp_path: Path) -> None:
    log = tmp_path / "submit.log"
    proc = start_submit("an interrupted cat", "--server", running.url, *SLOW, "--cancel-on-interrupt", cwd=tmp_path,
                        log=log)
    job_id = wait_for_text(log, r"job ([0-9a-f]{32}) queued", proc).group(1)
    wait_running(running.url, job_id)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    with Client(running.url) as client:
        assert client.wait(job_id, timeout=60).status is Status.canceled
    assert "Traceback" not in log.read_text()


def test_ctrl_c_without_a_terminal_to_ask_leaves_the_job_running(running: Service, tmp_path: Path) -> None:
    log = tmp_path / "submit.log"
    proc = start_submit("a cat left alone", "--server", running.url, *SLOW, cwd=tmp_path, log=log)
    job_id = wait_for_text(log, r"job ([0-9a-f]{32}) queued", proc).group(1)
    wait_running(running.url, job_id)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    text = log.read_text()
    assert "not asking whether to cancel" in text and f"job {job_id} goes on" in text
    with Client(running.url) as client:
        assert client.get(job_id).status is Status.running
        client.cancel(job_id)  # so that the worker is free for the next test
        assert client.wait(job_id, timeout=60).status is Status.canceled


def test_the_api_and_the_worker_log_json_lines(running: Service, tmp_path: Path) -> None:
    """SDQ_LOG_FORMAT=json (set for this module's service): every line either process wrote is one JSON object."""
    run = submit("a logged cat", "--server", running.url, *QUICK, cwd=tmp_path)
    assert run.returncode == 0
    job_id = re.search(r"job ([0-9a-f]{32}) queued", run.stderr).group(1)  # type: ignore[union-attr]
    for name in ("api", "worker"):
        [log] = running.workdir.glob(f"{name}-*.log")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines), name
    # the worker's lines about this job's batch name it in a field of their own, not only in the text
    batch = [line for line in lines if "batch of 1 jobs" in line["message"] and line.get("job_id") == job_id]
    assert batch, [line for line in lines if "batch of" in line["message"]]


def test_ctrl_c_on_a_terminal_asks_and_a_yes_cancels_the_job(running: Service, tmp_path: Path) -> None:
    """On a terminal: tqdm's bar, then, after Ctrl-C, the question; "y" cancels."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "sdqueue", "submit", "an asked cat", "--server", running.url,
                             *SLOW], cwd=tmp_path, env=environment(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    seen = ""

    def read_until(pattern: str) -> re.Match[str]:
        nonlocal seen
        deadline = time.monotonic() + 60
        while not (found := re.search(pattern, seen)):
            assert time.monotonic() < deadline and proc.poll() is None, f"no {pattern!r} in {seen!r}"
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096).decode(errors="replace")
        return found

    try:
        job_id = read_until(r"job ([0-9a-f]{32}) queued").group(1)
        read_until(r"\r.*steps: +[0-9]+%")  # tqdm redrawing its line
        wait_running(running.url, job_id)
        proc.send_signal(signal.SIGINT)
        read_until(rf"cancel job {job_id}\? \[y/N\]")
        os.write(master, b"y\n")
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    with Client(running.url) as client:
        assert client.wait(job_id, timeout=60).status is Status.canceled
