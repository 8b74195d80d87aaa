"""core.queues.connect: a client for every URL form redis-py takes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from core.queues import connect
from tests.redis_server import redis_binary


def test_a_unix_socket_url_connects(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([redis_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "redis-server did not open its socket"
            time.sleep(0.05)
        for timeout in (None, 2.0):
            client = connect(f"unix://{sock}", socket_timeout=timeout)
            assert client.ping() is True
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
