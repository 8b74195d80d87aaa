"""The worker's /metrics listener with its port taken, in a real `sdqueue worker` process: a port the operator set is a
one-line error and exit code 2; the default moves to the next free port, says so, and listens on loopback only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from core.settings import Settings
from tests.ports import listening_ips, occupied, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = Settings.model_fields["worker_metrics_port"].default


def worker_env(tmp_path: Path, checkpoint: Path, redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(PYTHONPATH=str(ROOT), SDQ_REDIS_URL=redis_url, SDQ_CHECKPOINT=str(checkpoint), SDQ_DEVICE="cpu",
               SDQ_DATA_DIR=str(tmp_path / "data"), **settings)
    return env


def test_a_chosen_port_that_is_taken_stops_the_worker_with_one_line(
    tmp_path: Path, tiny_checkpoint: Path, redis_url: str
) -> None:
    with occupied() as port:
        env = worker_env(tmp_path, tiny_checkpoint, redis_url, SDQ_WORKER_METRICS_PORT=str(port))
        # cwd: an empty folder, so no .env file adds settings
        done = subprocess.run([sys.executable, "-m", "sdqueue", "worker"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    [line] = [li for li in output.splitlines() if "already in use" in li]
    assert f"SDQ_WORKER_METRICS_PORT={port}: port {port} on 127.0.0.1 is already in use" in line
    assert "Traceback" not in output and "loaded" not in output  # stopped before loading the model


def test_a_taken_default_port_moves_to_the_next_free_one_on_loopback(
    tmp_path: Path, tiny_checkpoint: Path, redis_url: str
) -> None:
    log = tmp_path / "worker.log"
    with occupied(DEFAULT_PORT), open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "sdqueue", "worker"], cwd=tmp_path,
                                  env=worker_env(tmp_path, tiny_checkpoint, redis_url), stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            found = wait_for_line(log, r"worker metrics on http://127\.0\.0\.1:(\d+)/metrics", worker)
            port = int(found.group(1))
            assert port > DEFAULT_PORT
            assert f"port {DEFAULT_PORT} is in use, so worker metrics use port {port}" in log.read_text()
            assert listening_ips(worker.pid, port) == {"127.0.0.1"}
            assert "sdq_worker_busy" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            worker.terminate()
            worker.wait(60)
