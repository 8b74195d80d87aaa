"""What the kernel reports about the CPU (``/proc/cpuinfo``), for choices that depend on the CPU model and flags.

No torch import: the benchmarks' report writer uses it too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def first_processor() -> dict[str, str]:
    """The first processor's fields ("model name", "cpu family", "model", "flags", ...); empty where there is no
    /proc/cpuinfo. The machines this runs on have one kind of core, so the first describes them all."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags (``avx2``, ``avx512_bf16``, ``amx_bf16``, ...)."""
    return frozenset(first_processor().get("flags", "").split())
