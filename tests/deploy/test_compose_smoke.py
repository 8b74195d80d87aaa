"""Compose smoke test: the api and worker services of docker-compose.yml, run natively, take one job end to end.

No Docker engine runs here, so the test does what compose would do, minus containers: it reads docker-compose.yml,
interpolates it with an operator's settings, and starts each service's `command` with its `environment` as a local
process. The redis and minio services are replaced by a local redis-server and moto (an S3-compatible server); their
in-network addresses (redis://redis:6379, http://minio:9000), the bind-mounted model folder and the published ports are
mapped to their local equivalents. The job's image is then fetched through its presigned S3 URL and its metadata read
back with an independent A1111 parser.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sd_parsers import ParserManager

from core.imagefile import read_parameters
from tests.deploy import compose
from tests.redis_server import free_port
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

ROOT = compose.ROOT
JOB = {
    "prompt": "a lighthouse at dusk, oil painting",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "steps": 3,
    "sampler": "dpmpp_2m",
    "karras": True,
    "guidance_scale": 6.5,
    "seed": 1234,
}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import weights

    folder = tmp_path_factory.mktemp("models")
    weights.save_random_checkpoint(folder / "tiny.safetensors", *weights.tiny_configs())
    return folder


class NativeService:
    """One compose service's command and environment, run as a local process."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path) -> None:
        assert command[0] == "sdqueue", f"{name}: expected an sdqueue command, got {command}"
        self.name = name
        self.log_path = workdir / f"{name}.log"
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        with self.log_path.open("wb") as log:
            # cwd is an empty folder: no .env there, so the compose environment is all the process sees.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sdqueue", *command[1:]],
                cwd=workdir, env={**base, "PYTHONPATH": str(ROOT), **env}, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return f"--- {self.name}\n" + self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def native(service: dict[str, Any], replacements: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Command and environment of a compose service with in-network addresses and container paths made local."""

    def local(value: str) -> str:
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value

    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        replacements[target + "/"] = str(Path(source)) + "/"
    env = {name: local(str(value)) for name, value in service.get("environment", {}).items()}
    return [local(str(arg)) for arg in service["command"]], env


def wait_for(check: Callable[[], bool], timeout: float, what: str, services: list[NativeService]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        logs = "\n".join(s.log() for s in services)
        assert all(s.proc.poll() is None for s in services), f"a service exited while waiting for {what}\n{logs}"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}\n{logs}"
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def first_key(api_env: dict[str, str], workdir: Path) -> str:
    """What docs/deploy.md has the operator run: `docker compose run --rm api sdqueue apikey create NAME --store`."""
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    done = subprocess.run([sys.executable, "-m", "sdqueue", "apikey", "create", "me", "--store"], cwd=workdir,
                          env={**base, "PYTHONPATH": str(ROOT), **api_env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    [key] = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("key:")]
    return key


def test_compose_api_and_worker_run_a_job_into_s3(
    redis_url: str, s3_server: S3Server, models_dir: Path, tmp_path: Path
) -> None:
    api_port, metrics_port = free_port(), free_port()
    bucket = f"sdqueue-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)  # what the createbucket service does
    # An operator's .env for this host: no GPU, the tiny checkpoint, and the addresses clients use.
    operator_env = {
        "SDQ_S3_BUCKET": bucket,
        "SDQ_S3_PUBLIC_ENDPOINT_URL": s3_server.endpoint_url,
        "SDQ_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "SDQ_API_PORT": str(api_port),
        "SDQ_MODELS_DIR": str(models_dir),
        "SDQ_CHECKPOINT_FILE": "tiny.safetensors",
        "SDQ_DEVICE": "cpu",
        "MINIO_ROOT_USER": ACCESS_KEY_ID,
        "MINIO_ROOT_PASSWORD": SECRET_ACCESS_KEY,
    }
    services = compose.load(operator_env)["services"]
    published = {p.split(":")[-1]: p.split(":")[0] for p in services["api"]["ports"]}
    assert published == {"8000": str(api_port)}
    replacements = {
        "redis://redis:6379/0": redis_url,
        "http://minio:9000": s3_server.endpoint_url,
        "0.0.0.0": "127.0.0.1",  # containers listen on all interfaces; here only loopback
    }
    api_cmd, api_env = native(services["api"], dict(replacements))
    api_cmd[api_cmd.index("--port") + 1] = str(api_port)  # the host side of the published port
    worker_cmd, worker_env = native(services["worker"], dict(replacements))
    # Each container has its own network namespace; processes on one host need distinct metrics ports.
    worker_env["SDQ_WORKER_METRICS_PORT"] = str(metrics_port)
    for env in (api_env, worker_env):
        # What the images' ENV lines set.
        env.update({"SDQ_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert worker_env["SDQ_CHECKPOINT"] == str(models_dir / "tiny.safetensors")
    assert api_env["SDQ_STORAGE"] == worker_env["SDQ_STORAGE"] == "s3"
    assert api_env["SDQ_AUTH"] == "on"  # the published API requires keys

    running: list[NativeService] = []
    try:
        running.append(NativeService("api", api_cmd, api_env, tmp_path))
        running.append(NativeService("worker", worker_cmd, worker_env, tmp_path))
        api = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: answers(f"{api}/healthz"), 60, "the api's /healthz", running)
        wait_for(lambda: answers(f"{api}/readyz"), 120, "/readyz (a live worker)", running)

        assert httpx.post(f"{api}/v1/txt2img", json=JOB, timeout=10).status_code == 401
        auth = {"Authorization": f"Bearer {first_key(api_env, tmp_path)}"}
        submitted = httpx.post(f"{api}/v1/txt2img", json=JOB, headers=auth, timeout=10)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        job: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal job
            job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=auth, timeout=10).json()
            return job["status"] in ("succeeded", "failed", "canceled")

        wait_for(finished, 120, f"job {job_id}", running)
        assert job["status"] == "succeeded", f"{job}\n" + "\n".join(s.log() for s in running)

        [record] = job["images"]
        url = urlsplit(record["url"])
        assert f"{url.scheme}://{url.netloc}" == s3_server.endpoint_url  # the public endpoint, presigned
        assert url.path == f"/{bucket}/{record['key']}" and record["key"].startswith(f"{job_id}/0.")
        assert "X-Amz-Signature=" in url.query and "X-Amz-Expires=3600" in url.query
        image = httpx.get(record["url"], timeout=10)
        assert image.status_code == 200
        assert image.headers["content-type"] == record["content_type"] == "image/png"

        info = read_parameters(image.content)
        assert (info["width"], info["height"]) == (64, 64)
        assert info["prompt"] == JOB["prompt"] and info["negative_prompt"] == "blurry"
        parsed = ParserManager().parse(io.BytesIO(image.content))
        assert parsed is not None
        [sampler] = parsed.samplers
        assert sampler.name == "DPM++ 2M"
        assert [p.value for p in sampler.prompts] == [JOB["prompt"]]
        assert [p.value for p in sampler.negative_prompts] == ["blurry"]
        assert sampler.parameters["seed"] == "1234"
        assert sampler.parameters["steps"] == "3"
        assert sampler.parameters["cfg_scale"] == "6.5"

        head = s3_server.client().head_object(Bucket=bucket, Key=record["key"])
        assert head["ContentType"] == "image/png" and head["ContentLength"] == len(image.content)
        assert not (tmp_path / "data" / "images").exists()  # nothing went to local storage

        # The worker's metrics port is what deploy/prometheus/prometheus.yml scrapes.
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'sdq_worker_jobs_total{outcome="succeeded"} 1.0' in metrics
    finally:
        codes = {s.name: s.stop() for s in running}
    logs = "\n".join(s.log() for s in running)
    # SIGTERM: the worker exits 0 after its batch; uvicorn shuts down cleanly, then re-raises the signal.
    assert codes["worker"] == 0, logs
    assert codes["api"] in (0, -signal.SIGTERM) and "Application shutdown complete" in logs, logs
