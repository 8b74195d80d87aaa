"""Writing benchmark results into BENCHMARKS.md: one section per benchmark, replaced on each run."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path

from model.cpuinfo import first_processor

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


# The flags that decide which CPU kernels run (lscpu's "Flags" line, filtered)
_FLAGS_OF_NOTE = re.compile(r"^(avx.*|fma|f16c|amx.*)$")


def cpu_name() -> str:
    """The CPU's model name, as ``lscpu`` shows it."""
    return first_processor().get("model name") or platform.processor() or platform.machine()


def cpu_kind() -> str:
    """The model name with its family and model numbers, for section titles: one section per kind of CPU
    (virtual machines often show only "AMD EPYC" for every generation)."""
    fields = first_processor()
    if "cpu family" not in fields or "model" not in fields:
        return cpu_name()
    return f"{cpu_name()} family {fields['cpu family']} model {fields['model']}"


def cpu_line() -> str:
    """CPU model name, family / model numbers and the SIMD flags of note, as ``lscpu`` reports them."""
    fields = first_processor()
    flags = [f for f in fields.get("flags", "").split() if _FLAGS_OF_NOTE.match(f)]
    return f"{cpu_name()} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; " \
        f"flags {' '.join(flags) or 'none of avx/fma/amx'})"


def machine() -> str:
    """CPU (model and flags), core count, memory and accelerator, in one line."""
    cpu = cpu_line()
    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}, Python {platform.python_version()}"


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of BENCHMARKS.md, stamped with the date and machine."""
    stamp = f"_Run {dt.date.today().isoformat()} on {machine()}._\n\n"
    section = f"## {title}\n\n{stamp}{body.strip()}\n"
    header = "# Benchmarks\n\nFigures from `bench/`; re-run with `make bench`.\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else header
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
