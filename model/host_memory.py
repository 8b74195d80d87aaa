"""How much memory this process can still take: the kernel's estimate of available memory, capped by the cgroup
memory limit (a container's ``memory.max``), so optional speed-ups that cost memory never push a worker into
the out-of-memory killer.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def _meminfo(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def available_bytes(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> tuple[int, int] | None:
    """(available, total) bytes: ``MemAvailable`` and ``MemTotal``, both capped by a cgroup v2 limit when one is
    set (limit minus ``memory.current``, and the limit); None where neither can be read (not Linux)."""
    try:
        info = _meminfo(meminfo)
        available, total = info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available, total = min(available, int(limit) - used), min(total, int(limit))
    except (OSError, ValueError):
        pass
    return available, total


def room_for(extra: int, meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> bool:
    """True when ``extra`` more bytes still leave a reserve of a tenth of the memory (at least 1 GiB) free; True
    where the memory cannot be read."""
    memory = available_bytes(meminfo, cgroup)
    if memory is None:
        return True
    available, total = memory
    return available - extra >= max(1 << 30, total // 10)
