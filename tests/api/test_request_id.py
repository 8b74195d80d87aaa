"""Every answer carries an X-Request-ID (the client's own when it is sane), and with SDQ_LOG_FORMAT=json the API's
log lines are JSON objects that carry it, and the job id of a job's route."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import logs
from tests.ports import wait_for_line
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/healthz", 200), ("GET", "/v1/jobs/0123abcd", 404), ("POST", "/v1/txt2img", 422),
    ("DELETE", "/v1/txt2img", 405), ("GET", "/no/such/route", 404),
])
def test_every_answer_has_a_fresh_request_id(client: TestClient, method: str, path: str, status: int) -> None:
    first, second = (client.request(method, path, json={}) for _ in range(2))
    assert first.status_code == status
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_a_body_over_the_limit_gets_one_too(client: TestClient, settings: Any) -> None:
    r = client.post("/v1/txt2img", content=b"x" * (settings.max_body_bytes + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["x-request-id"]


def test_an_internal_error_answer_carries_the_request_id_too(settings: Any) -> None:
    # A 500 is sent by Starlette's outermost error middleware, outside the request-id middleware.
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom", headers={"X-Request-ID": "trace-500"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert r.headers["x-request-id"] == "trace-500"


def test_a_sane_client_id_is_kept_and_anything_else_replaced(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b"}).headers["x-request-id"] == "trace-42.a:b"
    for bad in ("two words", "x" * 129, "quote\"d", ""):
        echoed = client.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert echoed != bad and re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_the_json_formatter_writes_one_object_with_the_bound_ids_extras_and_the_traceback() -> None:
    record = logging.LogRecord("api.x", logging.ERROR, __file__, 1, "job %s failed", ("j1",), None)
    token = logs.request_id.set("req-1")
    try:
        logs.ContextFilter().filter(record)
    finally:
        logs.request_id.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.attempt = 2  # as `extra={"attempt": 2}` sets it
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "job j1 failed" and line["level"] == "ERROR" and line["logger"] == "api.x"
    assert line["request_id"] == "req-1" and "job_id" not in line and line["attempt"] == 2
    assert "ValueError: boom" in line["exc_info"] and line["time"].endswith("+00:00")


def test_sdqueue_api_logs_json_lines_that_carry_request_and_job_ids(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDQ_")}
    env.update({"PYTHONPATH": str(ROOT), "SDQ_REDIS_URL": redis_url, "SDQ_DATA_DIR": str(tmp_path / "data"),
                "SDQ_LOG_FORMAT": "json"})
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdqueue", "api", "--port", str(port), "--access-log"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log, r"Uvicorn running on", proc, timeout=60)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", headers={"X-Request-ID": "probe-1"}).status_code == 200
        job = httpx.get(f"{base}/v1/jobs/feedface", headers={"X-Request-ID": "look-2"})
        assert job.status_code == 404
        wait_for_line(log, r'"request_id": "look-2"', proc, timeout=20)
        time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(20)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert "\x1b" not in text and "color_message" not in text
    assert any(line["logger"] == "uvicorn.error" and "Uvicorn running" in line["message"] for line in lines)
    probe = [line for line in lines if line.get("request_id") == "probe-1"]
    assert probe and "/healthz" in probe[0]["message"] and probe[0]["logger"] == "uvicorn.access"
    look = [line for line in lines if line.get("request_id") == "look-2"]
    assert look and look[0]["job_id"] == "feedface" and "404" in look[0]["message"]
