"""A real `sdqueue webhooks` process through Redis outages: Redis killed and restarted, or full (``maxmemory`` +
``noeviction``), while a delivery is in flight. The sender must live on, record the delivered message once Redis
takes writes again (without sending it a second time), and deliver what is queued afterwards.

The receiver holds the first request until the test lets it answer, so the outage begins while the message is being
sent, deterministically.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler
from rq.worker import Worker

from core import jobstore, jobview
from core.jobs import GenerationParams
from core.queues import Keys
from core.settings import load_settings
from core.webhook_queue import enqueue_delivery
from sdqueue.webhooks import SCHEDULER_STOP_S, WebhookWorker
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "a webhook signing secret of 32 bytes"
OUTAGE_S = 4  # several backoff waits of the sender (capped at its 1 s heartbeat)


@dataclass
class HeldReceiver:
    """A loopback receiver that records each request's ``webhook-id`` and holds the first one until ``release()``."""

    arrived: threading.Event
    released: threading.Event
    ids: list[str]
    server: ThreadingHTTPServer

    @classmethod
    def start(cls) -> HeldReceiver:
        arrived, released, ids = threading.Event(), threading.Event(), []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                ids.append(self.headers["webhook-id"])
                if not arrived.is_set():
                    arrived.set()
                    released.wait(60)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return cls(arrived, released, ids, server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Sender:
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendfsync="always", maxmemory_mb=32)
    yield server
    server.stop()


@pytest.fixture
def redis(server: RedisServer) -> Iterator[Redis]:
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def receiver() -> Iterator[HeldReceiver]:
    receiver = HeldReceiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def sender(server: RedisServer, redis: Redis, tmp_path: Path) -> Iterator[Sender]:
    env = {
        **os.environ,
        "SDQ_REDIS_URL": server.url,
        "SDQ_DATA_DIR": str(tmp_path / "data"),
        "SDQ_WEBHOOK_SECRET": SECRET,
        "SDQ_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
        "SDQ_WEBHOOK_METRICS_PORT": "0",
        "SDQ_HEARTBEAT_S": "1",
    }
    log = tmp_path / "webhooks.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdqueue", "webhooks"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    sender = Sender(proc, log)
    queue = Queue(Keys(load_settings().queue_prefix).webhooks(), connection=redis)
    wait_for(lambda: any(w.pid == proc.pid for w in Worker.all(connection=redis, queue=queue)), 30,
             "the webhook sender to register", sender)
    yield sender
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, sender: Sender) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert sender.proc.poll() is None, f"the webhook sender exited while waiting for {what}:\n{sender.tail()}"
        try:
            if condition():
                return
        except RedisError:  # Redis still away: not yet
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}:\n{sender.tail()}"
        time.sleep(0.05)


def queue_message(redis: Redis, url: str) -> str:
    settings = load_settings(webhook_secret=SECRET, webhook_allow_private=True)
    params = GenerationParams.model_validate({"prompt": "a cat", "webhook": url})
    view = jobview.queued_view(jobstore.new_job_spec(params), queue_position=0)
    msg_id = enqueue_delivery(redis, settings, view, "completed")
    assert msg_id is not None
    return msg_id


def status(redis: Redis, msg_id: str) -> JobStatus | None:
    return Job.fetch(msg_id, connection=redis).get_status()


def deliver_through(redis: Redis, receiver: HeldReceiver, sender: Sender, begin: Callable[[], None],
                    end: Callable[[], None]) -> None:
    """A message is in flight when ``begin`` takes Redis away; the receiver answers; ``end`` brings Redis back."""
    first = queue_message(redis, receiver.url)
    wait_for(receiver.arrived.is_set, 30, "the first delivery to arrive", sender)
    begin()
    receiver.release()  # delivered while Redis is away: the sender must record it later
    time.sleep(OUTAGE_S)
    assert sender.proc.poll() is None, f"the webhook sender exited during the outage:\n{sender.tail()}"
    end()

    wait_for(lambda: status(redis, first) == JobStatus.FINISHED, 60, "the in-flight message to be recorded", sender)
    second = queue_message(redis, receiver.url)
    wait_for(lambda: status(redis, second) == JobStatus.FINISHED, 60, "a message queued after the outage", sender)
    assert receiver.ids.count(first) == 1, (receiver.ids, sender.tail())  # recorded, not sent again
    assert receiver.ids.count(second) == 1, (receiver.ids, sender.tail())


def test_the_sender_rides_out_a_redis_restart_during_a_delivery(
    server: RedisServer, redis: Redis, receiver: HeldReceiver, sender: Sender
) -> None:
    deliver_through(redis, receiver, sender, server.kill, server.start)


def test_the_sender_rides_out_a_full_redis_during_a_delivery(
    server: RedisServer, redis: Redis, receiver: HeldReceiver, sender: Sender
) -> None:
    deliver_through(redis, receiver, sender, server.fill, server.free)


def test_the_sender_imports_neither_torch_nor_the_worker() -> None:
    """It runs from the API image, which has no torch."""
    code = (
        "import sys\n"
        "import sdqueue.webhooks, sdqueue.webhook_delivery\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'worker', 'numpy'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_sigterm_stops_an_idle_sender_with_exit_code_0(sender: Sender) -> None:
    sender.proc.terminate()
    assert sender.proc.wait(30) == 0, sender.tail()


def _deaf_scheduler(deaf: Any) -> None:
    """A scheduler process that lost its SIGTERM: the signal reached it before it installed its handlers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deaf.set()
    time.sleep(120)


def test_stopping_a_scheduler_that_lost_its_sigterm_kills_it(redis: Redis) -> None:
    worker = WebhookWorker([Keys(load_settings().queue_prefix).webhooks()], connection=redis, heartbeat_s=1)
    scheduler = RQScheduler(worker.queues, connection=redis)
    context = multiprocessing.get_context("fork")
    deaf = context.Event()
    process = context.Process(target=_deaf_scheduler, args=(deaf,), daemon=True)
    process.start()
    assert deaf.wait(30)
    scheduler._process = process  # type: ignore[assignment]  # RQ types it as None before start()
    worker.scheduler = scheduler
    stopper = threading.Thread(target=worker.stop_scheduler, daemon=True)
    started = time.monotonic()
    stopper.start()
    stopper.join(SCHEDULER_STOP_S + 20)
    try:
        assert not stopper.is_alive(), "stop_scheduler still waits on a scheduler that ignores SIGTERM"
        assert not process.is_alive()
        assert time.monotonic() - started < SCHEDULER_STOP_S + 20
    finally:
        if process.is_alive():
            process.kill()
