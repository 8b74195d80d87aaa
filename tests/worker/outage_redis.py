"""A redis-server that a test can take away and bring back: kill and restart on the same port with its data
(append-only file, fsynced on every write, so a SIGKILL loses nothing), pause (SIGSTOP) and resume, fill up to its
``maxmemory`` (``noeviction``: writes then fail with OOM) and free again."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis.exceptions
from redis import Redis

from tests.redis_server import free_port, redis_binary

FILLER = "test:filler"


class OutageRedis:
    def __init__(self, workdir: Path, maxmemory_mb: int = 32) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always",
            "--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction",
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.limit = f"{maxmemory_mb}mb"
        self.start()

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        """Start it (again, on the same port, reloading its data) and wait until it answers."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:  # refused, or still loading its data
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def fill(self) -> None:
        """Use all of ``maxmemory`` with one key, so that every write fails with Redis' OOM error until ``free``.

        A command's own arguments count as used memory while Redis reads it, so the key grows a MiB at a time until
        Redis refuses; the limit then goes 2 MiB below what is used, or the refused command's freed buffer would
        let small writes through again."""
        client = self.client()
        try:
            for _ in range(4096):
                client.append(FILLER, b"x" * 2**20)
            raise AssertionError("Redis still accepts writes after 4 GiB of filler: is maxmemory set?")
        except redis.exceptions.OutOfMemoryError:
            pass
        self.limit = client.config_get("maxmemory")["maxmemory"]
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2**21)
        try:
            client.set("test:probe", b"1")
            raise AssertionError("Redis accepts writes while full")
        except redis.exceptions.OutOfMemoryError:
            pass
        finally:
            client.close()

    def free(self) -> None:
        client = self.client()
        client.delete(FILLER)
        client.config_set("maxmemory", self.limit)
        client.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
