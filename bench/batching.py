"""Cross-request batching: 8 jobs submitted at once (the worker runs them as one batch) vs the same 8 one by one.

Real processes on this machine: a redis-server and one `sdqueue worker`; jobs are enqueued exactly as the API does
(`core.jobstore.enqueue`), all with the same size, sampler and steps and different seeds. Throughput = 8 images /
wall time from the first submission to the last job finished. "One by one" submits a job, waits until it has
succeeded, then submits the next. Both runs follow a warm-up (one job alone, one batch of 8), since the first call
at a new batch size pays for kernel setup, and the two modes alternate over rounds so that load from other processes
on the machine affects both alike. Two models: the tiny test checkpoint, and SD 1.5-size random weights
(written once, ~4 GB in fp32, to --workdir or a temporary directory).

    python bench/batching.py [--models tiny,sd15] [--rounds 2] [--workdir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq.worker import Worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import markdown_table, write_section
from core.jobs import GenerationParams
from core.jobstore import enqueue, new_job_spec
from core.queues import Keys
from core.settings import Settings, load_settings
from sdqueue.dev import free_port, redis_binary

log = logging.getLogger("bench.batching")

ROOT = Path(__file__).resolve().parent.parent
JOBS = 8
WINDOW_MS = 100


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    steps: int
    write_checkpoint: Callable[[Path], Path]


def tiny_checkpoint(path: Path) -> Path:
    from model.weights import save_random_checkpoint, tiny_configs

    return save_random_checkpoint(path, *tiny_configs())


def sd15_checkpoint(path: Path) -> Path:
    from model.clip_config import clip_text_config
    from model.unet import UNetConfig
    from model.vae import VAEConfig
    from model.weights import save_random_checkpoint

    return save_random_checkpoint(path, UNetConfig(), VAEConfig(), clip_text_config())


CASES = {
    "tiny": Case("tiny test checkpoint", 64, 4, tiny_checkpoint),
    "sd15": Case("SD 1.5 size, random weights", 256, 4, sd15_checkpoint),
}


class Service:
    """redis-server plus one worker process; stopped on exit."""

    def __init__(self, workdir: Path, checkpoint: Path) -> None:
        port = free_port()
        self.redis_proc = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.settings: Settings = load_settings(
            redis_url=f"redis://127.0.0.1:{port}/0", data_dir=workdir / "data", checkpoint=checkpoint,
            batch_window_ms=WINDOW_MS, max_batch_images=JOBS,
        )
        self.redis = Redis.from_url(self.settings.redis_url)
        wait(lambda: ping(self.redis), 15, "redis-server")
        self.metrics_port = free_port()
        env = {**os.environ, "SDQ_REDIS_URL": self.settings.redis_url, "SDQ_DATA_DIR": str(self.settings.data_dir),
               "SDQ_CHECKPOINT": str(checkpoint), "SDQ_BATCH_WINDOW_MS": str(WINDOW_MS),
               "SDQ_MAX_BATCH_IMAGES": str(JOBS), "SDQ_WORKER_METRICS_PORT": str(self.metrics_port)}
        with open(workdir / "worker.log", "wb") as out:
            self.worker = subprocess.Popen([sys.executable, "-m", "sdqueue", "worker"], cwd=ROOT, env=env,
                                           stdout=out, stderr=subprocess.STDOUT)
        wait(lambda: len(Worker.all(connection=self.redis)) == 1, 600, "the worker to load the model")

    def submit(self, seed: int, size: int, steps: int) -> str:
        params = GenerationParams.model_validate({
            "prompt": "a photo of an astronaut riding a horse", "width": size, "height": size, "steps": steps,
            "sampler": "euler_a", "seed": seed,
        })
        spec = new_job_spec(params)
        enqueue(self.redis, self.settings, spec)
        return spec.id

    def wait_done(self, job_ids: list[str], timeout: float = 3600) -> None:
        """Until every job has succeeded, reading the jobs' event logs with blocking reads: a polling loop would take
        CPU time (client and Redis) from the worker, which on a 2-core machine slows its threads far more than the
        polling itself costs."""
        keys = Keys(self.settings.queue_prefix)
        last = {keys.event_log(j): "0" for j in job_ids}
        deadline = time.monotonic() + timeout
        while last:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {len(last)} job(s) to finish")
            for stream, entries in self.redis.xread(last, block=1000) or []:  # type: ignore[union-attr]
                name = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    last[name] = entry_id
                    event = json.loads(fields[b"message"])["event"]
                    if event in ("failed", "canceled"):
                        raise RuntimeError(f"a benchmark job {event}; see the worker log")
                    if event == "succeeded":
                        del last[name]
                        break

    def mean_batch(self) -> tuple[float, float]:
        """(sum, count) of the worker's sdq_batch_size histogram."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                  if line.startswith(("sdq_batch_size_sum", "sdq_batch_size_count"))}
        return values["sdq_batch_size_sum"], values["sdq_batch_size_count"]

    def stop(self) -> None:
        for proc in (self.worker, self.redis_proc):
            proc.terminate()
            proc.wait(60)


def ping(redis: Redis) -> bool:
    try:
        return bool(redis.ping())
    except Exception:
        return False


def wait(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(poll)


def measure(service: Service, case: Case, rounds: int) -> dict[str, Any]:
    """Median wall times of ``rounds`` alternating rounds (one by one, then at once), after a warm-up."""
    seeds = iter(range(10_000))
    log.info("%s: warm-up", case.name)
    service.wait_done([service.submit(next(seeds), case.size, case.steps)])
    service.wait_done([service.submit(next(seeds), case.size, case.steps) for _ in range(JOBS)])
    one_by_one, at_once, batches = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(JOBS):
            service.wait_done([service.submit(next(seeds), case.size, case.steps)])
        one_by_one.append(time.perf_counter() - start)
        log.info("%s: one by one %.2f s", case.name, one_by_one[-1])

        before = service.mean_batch()
        start = time.perf_counter()
        service.wait_done([service.submit(next(seeds), case.size, case.steps) for _ in range(JOBS)])
        at_once.append(time.perf_counter() - start)
        after = service.mean_batch()
        batches.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
        log.info("%s: at once %.2f s", case.name, at_once[-1])
    return {"one_by_one": statistics.median(one_by_one), "at_once": statistics.median(at_once),
            "mean_batch": statistics.mean(batches),
            "rounds": [a / b for a, b in zip(one_by_one, at_once, strict=True)]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,sd15", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the checkpoints between runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    rows = []
    for key in args.models.split(","):
        case = CASES[key]
        checkpoint = workdir / f"{key}.safetensors"
        if not checkpoint.exists():
            log.info("writing %s checkpoint to %s", case.name, checkpoint)
            case.write_checkpoint(checkpoint)
        run_dir = workdir / f"run-{key}"
        run_dir.mkdir(exist_ok=True)
        service = Service(run_dir, checkpoint)
        try:
            r = measure(service, case, args.rounds)
        finally:
            service.stop()
        rows.append([case.name, f"{case.size}x{case.size}, {case.steps} steps", f"{r['one_by_one']:.2f}",
                     f"{JOBS / r['one_by_one']:.2f}", f"{r['at_once']:.2f}", f"{JOBS / r['at_once']:.2f}",
                     f"{r['mean_batch']:.1f}", f"{r['one_by_one'] / r['at_once']:.2f}x",
                     ", ".join(f"{x:.2f}x" for x in r["rounds"])])
    body = (
        f"{JOBS} txt2img jobs (euler_a, CFG 7.5, different seeds), one `sdqueue worker` process on the CPU "
        f"(dtype auto), `SDQ_MAX_BATCH_IMAGES={JOBS}`, `SDQ_BATCH_WINDOW_MS={WINDOW_MS}`, jobs enqueued as the API "
        "does. One by one: submit, wait until succeeded, next. At once: all submitted together. Wall time from the "
        f"first submission to the last success, after a warm-up; median of {args.rounds} alternating rounds.\n\n"
        + markdown_table(["model", "job", "one by one s", "images/s", "at once s", "images/s",
                          "images per pipeline call (at once)", "speed-up (medians)", "speed-up per round"], rows)
        + "\n\nTarget: >= 1.3x at SD 1.5 size on this CPU (>= 3x on a GPU at 512x512). The machine is shared: "
        "when other processes load it, a round's times move by 2x or more, hence the rounds."
    )
    if not args.no_write:
        write_section("Batching: 8 jobs at once vs one by one", body)
    log.info("\n%s", body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
