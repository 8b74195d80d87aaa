"""Property-based testing of the running API against its own OpenAPI spec (schemathesis): no request it can make
gets a 5xx, an undocumented status, a body that breaks the documented schema, or an undocumented content type.

A real `sdqueue api` process on a real Redis. No worker runs, but one is registered so that /readyz answers 200 (a
503 there is by design and would count as a server error). The events stream is left out: without a worker its
jobs never end, so the stream would not either; tests/api/test_events.py and tests/e2e cover it. So are the OpenAI
Images routes, which answer when their job ends (tests/api/test_openai_routes.py, tests/e2e/test_openai_images.py),
and A1111's txt2img and img2img, for the same reason (tests/api/test_a1111_routes.py, tests/e2e/test_a1111.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue, Worker

from core.queues import Keys
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"


def test_the_api_meets_its_openapi_spec(redis_url: str, tmp_path: Path) -> None:
    redis = Redis.from_url(redis_url)
    Worker([Queue(name, connection=redis) for name in Keys().queues()], connection=redis,
           name="idle-for-readyz").register_birth()
    port = free_port()
    env = {**os.environ, "SDQ_REDIS_URL": redis_url, "SDQ_DATA_DIR": str(tmp_path / "data"),
           "SDQ_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        api = subprocess.Popen([sys.executable, "-m", "sdqueue", "api", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", api)
        result = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "run", f"http://127.0.0.1:{port}/openapi.json",
             # One worker: hypothesis parses lambdas with `ast` from several threads otherwise, which CPython 3.11
             # can fail at ("AST constructor recursion depth mismatch").
             "--checks", CHECKS, "--max-examples", "20", "--workers", "1", "--request-timeout", "20",
             "--exclude-path", "/v1/jobs/{job_id}/events",
             "--exclude-path", "/sdapi/v1/txt2img", "--exclude-path", "/sdapi/v1/img2img",
             "--exclude-path-regex", "^/v1/images/(generations|edits|variations)$",
             "--report-dir", str(tmp_path / "report"),
             "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
    finally:
        api.terminate()
        api.wait(15)
        redis.close()
    assert result.returncode == 0, f"{result.stdout[-12000:]}\n{result.stderr[-3000:]}\n--- API log\n" + \
        log.read_text(errors="replace")[-5000:]
    assert "Traceback" not in log.read_text(errors="replace")


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the API exited at start"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")
