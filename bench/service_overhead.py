"""Service overhead: what the HTTP path adds to the pipeline's own time, and how fast the API accepts jobs.

Real processes on this machine: a redis-server, `sdqueue api` (one process) and `sdqueue worker`, on the tiny
checkpoint of the real architecture, so the pipeline is short and the service's own costs stand out.

1. Overhead per job: (a) the pipeline time the worker records for the job (`timings.run_seconds`) against (b) the
   end-to-end time an HTTP client sees (submit, poll until succeeded, download the image), with one client and with
   8 concurrent clients, then with one client and no batch window; overhead = (b) - (a), p50 and p95, and where it
   goes (submit, queue, after the pipeline, poll, download). With 8 clients, (b) also holds the wait behind other
   batches.
2. Submissions per second with 50 concurrent clients (no worker running, so every job stays queued), then a check
   that every accepted job is in Redis. The load comes from a minimal asyncio HTTP/1.1 client, because httpx would
   spend more CPU per request than the API does on this 2-core machine; httpx's figure is shown too.

    python bench/service_overhead.py [--jobs 40] [--submissions 5000] [--poll-ms 5] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
from redis import Redis
from rq import Queue
from rq.job import Job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section
from core.queues import Keys
from sdqueue.dev import free_port, redis_binary

log = logging.getLogger("bench.service")

ROOT = Path(__file__).resolve().parent.parent

JOB = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "sampler": "euler"}


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        for p in [proc] if proc else self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout} s")
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- 1. overhead per job ------------------------------------------------------------------------------------------

async def one_job(http: httpx.AsyncClient, poll_s: float) -> dict[str, float]:
    """One job as a client sees it, with its end-to-end time split into parts (seconds)."""
    start_wall, start = time.time(), time.perf_counter()
    job = (await http.post("/v1/txt2img", json=JOB)).json()
    submitted = time.perf_counter()
    while job["status"] not in ("succeeded", "failed", "canceled"):
        await asyncio.sleep(poll_s)
        job = (await http.get(f"/v1/jobs/{job['id']}")).json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
    seen_wall, seen = time.time(), time.perf_counter()
    for image in job["images"]:
        (await http.get(image["url"])).raise_for_status()
    end = time.perf_counter()
    started, finished = (datetime.fromisoformat(job[k]).timestamp() for k in ("started_at", "finished_at"))
    pipeline = float(job["timings"]["run_seconds"])
    return {
        "e2e": end - start,
        "pipeline": pipeline,
        "overhead": end - start - pipeline,
        "submit": submitted - start,
        "queue": started - (start_wall + (submitted - start)),  # response received -> batch started
        "after": finished - started - pipeline,  # PNG encoding, storage, result record
        "seen": seen_wall - finished,  # finished -> the client's poll sees it
        "download": end - seen,
    }


async def overhead(url: str, jobs: int, clients: int, poll_s: float) -> list[dict[str, float]]:
    results: list[dict[str, float]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await one_job(http, poll_s)  # warm-up: first-call costs in the worker and the API

        async def client(n: int) -> None:
            for _ in range(n):
                results.append(await one_job(http, poll_s))

        await asyncio.gather(*[client(jobs // clients) for _ in range(clients)])
    return results


def ms(results: list[dict[str, float]], key: str, q: float = 0.5) -> str:
    return f"{1000 * percentile([r[key] for r in results], q):.1f}"


def overhead_row(label: str, results: list[dict[str, float]]) -> list[str]:
    return [label, str(len(results)), ms(results, "pipeline"), ms(results, "e2e"), ms(results, "e2e", 0.95),
            f"**{ms(results, 'overhead')}**", ms(results, "overhead", 0.95)]


def parts_row(label: str, results: list[dict[str, float]]) -> list[str]:
    return [label] + [ms(results, k) for k in ("submit", "queue", "after", "seen", "download")]


# --- 2. submissions per second ------------------------------------------------------------------------------------

async def raw_submissions(port: int, total: int, clients: int) -> tuple[float, list[str]]:
    """`total` POSTs over `clients` keep-alive connections; returns (seconds, ids of the jobs accepted)."""
    body = json.dumps(JOB).encode()
    request = (b"POST /v1/txt2img HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    remaining = total
    accepted: list[str] = []

    async def client() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining > 0:
            remaining -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            reply = await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 202"):
                accepted.append(json.loads(reply)["id"])
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return time.perf_counter() - start, accepted


async def httpx_submissions(url: str, total: int, clients: int) -> tuple[float, list[str]]:
    remaining = total
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients), timeout=60) as http:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                r = await http.post("/v1/txt2img", json=JOB)
                if r.status_code == 202:
                    accepted.append(r.json()["id"])

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return time.perf_counter() - start, accepted


def all_in_redis(redis: Redis, ids: list[str]) -> bool:
    """Every accepted id has its RQ job hash and sits in a queue, and the queues hold nothing else."""
    pipe = redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.exists(Job.key_for(job_id))
    hashes = sum(pipe.execute())
    queued = sum(len(Queue(name, connection=redis)) for name in Keys().all_queues(redis))
    return hashes == len(ids) == queued


# --- main -----------------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40, help="jobs per overhead run (split over the clients)")
    parser.add_argument("--submissions", type=int, default=5000)
    parser.add_argument("--poll-ms", type=float, default=5.0, help="client poll interval while a job runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from model import weights  # only the bench process and the worker load torch

    workdir = Path(tempfile.mkdtemp(prefix="sdq-bench-"))
    checkpoint = weights.save_random_checkpoint(workdir / "tiny.safetensors", *weights.tiny_configs())
    redis_port, api_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"
    env = {**os.environ, "SDQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SDQ_DATA_DIR": str(workdir / "data"),
           "SDQ_PUBLIC_URL": url, "SDQ_CHECKPOINT": str(checkpoint), "SDQ_DEVICE": "cpu",
           "SDQ_WORKER_METRICS_PORT": "0", "SDQ_LOG_LEVEL": "WARNING"}
    procs = Processes(workdir)
    try:
        procs.start("redis", [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(workdir)])
        procs.start("api", [sys.executable, "-m", "sdqueue", "api", "--port", str(api_port)], env)
        wait_for(f"{url}/healthz", 30)
        redis = Redis.from_url(env["SDQ_REDIS_URL"])

        # 2. submissions/s, before any worker takes jobs off the queues: one API process, then two.
        raw: list[list[str]] = []
        for processes in (1, 2):
            port = api_port if processes == 1 else free_port()
            api = None
            if processes > 1:
                api = procs.start("api-2", [sys.executable, "-m", "sdqueue", "api", "--port", str(port),
                                            "--workers", str(processes)], env)
                wait_for(f"http://127.0.0.1:{port}/healthz", 30)
            asyncio.run(raw_submissions(port, 500, 50))  # warm-up
            redis.flushdb()
            seconds, ids = asyncio.run(raw_submissions(port, args.submissions, 50))
            ok = all_in_redis(redis, ids)
            raw.append([f"minimal asyncio HTTP/1.1 client, {processes} API process{'es' if processes > 1 else ''}",
                        f"**{len(ids) / seconds:,.0f}**", "yes" if ok else "**NO**"])
            log.info("%s", " | ".join(raw[-1]))
            redis.flushdb()
            if api is not None:
                procs.stop(api)
        seconds, ids = asyncio.run(httpx_submissions(url, min(args.submissions, 2000), 50))
        raw.append(["httpx.AsyncClient (client-bound), 1 API process", f"{len(ids) / seconds:,.0f}",
                    "yes" if all_in_redis(redis, ids) else "**NO**"])
        log.info("%s", " | ".join(raw[-1]))
        redis.flushdb()

        # 1. overhead per job: default batch window, then none (a lone job then starts at once).
        poll_s = args.poll_ms / 1000
        rows, parts = [], []
        runs = (("1 client, sequential", 1, None), ("8 concurrent clients", 8, None),
                ("1 client, sequential, `SDQ_BATCH_WINDOW_MS=0`", 1, "0"))
        worker = None
        for label, clients, window in runs:
            if worker is None or window is not None:
                if worker is not None:
                    procs.stop(worker)
                worker = procs.start(f"worker-{window}", [sys.executable, "-m", "sdqueue", "worker"],
                                     {**env, **({"SDQ_BATCH_WINDOW_MS": window} if window else {})})
                wait_for(f"{url}/readyz", 120)
            results = asyncio.run(overhead(url, args.jobs, clients, poll_s))
            rows.append(overhead_row(label, results))
            parts.append(parts_row(label, results))
            log.info("%s", " | ".join(rows[-1]))
    finally:
        procs.stop()

    body = "\n\n".join([
        f"Tiny checkpoint (real architecture), {JOB['width']}x{JOB['height']}, {JOB['steps']} {JOB['sampler']} "
        f"steps, one image per job; one API process, one worker, local storage; the client polls every "
        f"{args.poll_ms:g} ms. Pipeline = the worker's `timings.run_seconds`; end to end = submit, poll until "
        "succeeded, download the PNG; overhead = end to end - pipeline. Times in ms. With 8 clients the jobs share "
        "batches, so the pipeline time is a batch's and the overhead includes waiting behind other batches.",
        markdown_table(["clients", "jobs", "pipeline p50", "end-to-end p50", "end-to-end p95", "overhead p50",
                        "overhead p95"], rows),
        "Where the overhead goes (p50, ms): *submit* = POST round trip; *queue* = response to batch start (RQ "
        "dequeue, then the batch window `SDQ_BATCH_WINDOW_MS`, default 30 ms, waiting for compatible jobs); "
        "*after* = batch start + pipeline to finished (PNG, storage, result); *seen* = finished to the client's "
        "poll seeing it; *download* = image GET.",
        markdown_table(["run", "submit", "queue", "after", "seen", "download"], parts),
        "Submissions accepted per second, 50 concurrent clients on keep-alive connections, no worker running:",
        markdown_table(["load generator, API", "accepted/s", "all accepted jobs in Redis"], raw),
        f"The load generator shares the machine's cores with the API and Redis (load average at the end: "
        f"{os.getloadavg()[0]:.1f}).",
    ])
    print(body)
    if not args.no_write:
        write_section("Service overhead (bench/service_overhead.py)", body)


if __name__ == "__main__":
    main()
