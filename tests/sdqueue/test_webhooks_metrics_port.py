"""The webhook sender's /metrics listener with its port taken, in a real `sdqueue webhooks` process (as the worker's:
tests/worker/test_metrics_port.py), and on the interface SDQ_METRICS_HOST names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from core.settings import Settings
from tests.ports import listening_ips, occupied, wait_for_line

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = Settings.model_fields["webhook_metrics_port"].default


def sender_env(redis_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update(PYTHONPATH=str(ROOT), SDQ_REDIS_URL=redis_url, **settings)
    return env


def start_sender(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "webhooks.log"
    with open(log, "wb") as out:
        # cwd: an empty folder, so no .env file adds settings
        proc = subprocess.Popen([sys.executable, "-m", "sdqueue", "webhooks"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(60)


def test_a_chosen_port_that_is_taken_stops_the_sender_with_one_line(tmp_path: Path, redis_url: str) -> None:
    with occupied() as port:
        done = subprocess.run([sys.executable, "-m", "sdqueue", "webhooks"], cwd=tmp_path,
                              env=sender_env(redis_url, SDQ_WEBHOOK_METRICS_PORT=str(port)), capture_output=True,
                              text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    [line] = [li for li in output.splitlines() if "already in use" in li]
    assert f"SDQ_WEBHOOK_METRICS_PORT={port}: port {port} on 127.0.0.1 is already in use" in line
    assert "Traceback" not in output


def test_a_taken_default_port_moves_to_the_next_free_one_on_loopback(tmp_path: Path, redis_url: str) -> None:
    with occupied(DEFAULT_PORT):
        sender, log = start_sender(tmp_path, sender_env(redis_url))
        try:
            found = wait_for_line(log, r"webhook sender metrics on http://127\.0\.0\.1:(\d+)/metrics", sender)
            port = int(found.group(1))
            assert port > DEFAULT_PORT
            assert f"port {DEFAULT_PORT} is in use, so webhook sender metrics use port {port}" in log.read_text()
            assert listening_ips(sender.pid, port) == {"127.0.0.1"}
            assert "sdq_webhook" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            stop(sender)


def test_the_metrics_host_setting_chooses_the_interface(tmp_path: Path, redis_url: str) -> None:
    with occupied() as port:
        pass  # a port that was free a moment ago
    sender, log = start_sender(tmp_path, sender_env(redis_url, SDQ_METRICS_HOST="0.0.0.0",
                                                    SDQ_WEBHOOK_METRICS_PORT=str(port)))
    try:
        wait_for_line(log, rf"webhook sender metrics on http://0\.0\.0\.0:{port}/metrics", sender)
        assert listening_ips(sender.pid, port) == {"0.0.0.0"}
    finally:
        stop(sender)


def test_a_bad_metrics_host_is_one_line_naming_the_setting(tmp_path: Path, redis_url: str) -> None:
    done = subprocess.run([sys.executable, "-m", "sdqueue", "webhooks"], cwd=tmp_path,
                          env=sender_env(redis_url, SDQ_METRICS_HOST="no-such-host.invalid"), capture_output=True,
                          text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "SDQ_METRICS_HOST" in output and "Traceback" not in output
