"""Port helpers for tests of listeners: hold a port taken, see where a process listens, wait for a log line."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


@contextlib.contextmanager
def occupied(port: int = 0) -> Iterator[int]:
    """Hold `port` on 127.0.0.1 (0: a free one) with a listening socket, as another server would; yields the port.

    A port some other process holds already is just as taken, so that one is yielded as it is."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            yield port
            return
        s.listen()
        yield int(s.getsockname()[1])


def listening_ips(pid: int, port: int) -> set[str]:
    """Addresses process `pid` listens on at `port` (TCP)."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> re.Match[str]:
    """The first match of `pattern` in the process' log, once it appears; fails when the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found
        assert proc.poll() is None, f"exited ({proc.returncode}) before logging {pattern!r}:\n{text[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {pattern!r}:\n{text[-4000:]}"
        time.sleep(0.1)
