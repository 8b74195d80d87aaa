"""The CPU self-check's choices kept on disk, so a process on the same machine skips the measuring.

The self-check (``model.cpu_choice``) runs each measured layer four times on a network's first pass: on a 2-core
machine that made the first SD 1.5 image at 256x256 cost 2-3x a later one. Its outcome depends only on the CPU,
the PyTorch build, the instruction-set caps in force, the thread count, the network, the dtype and the input shape,
so each choice is stored under exactly those, like a compiler's autotuning cache: a process that finds its key
takes the stored path without measuring, and anything else (another CPU model or microcode flags, another
PyTorch, ``ONEDNN_MAX_CPU_ISA`` set, another size) measures again and adds its own entry.

The file is JSON, one entry per key, written atomically (a temporary file renamed over it), so workers sharing
a host can share it; two writing at once can lose an entry, which is measured again on a later start. A file that
cannot be read or written is logged and ignored: the self-check then measures as it would without a store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.cpuinfo import first_processor

log = logging.getLogger(__name__)

VERSION = 1  # bumped when the self-check's measuring changes what a choice means
OFF = "off"


def default_path() -> Path:
    """``$XDG_CACHE_HOME/sdqueue/cpu-choices.json`` (``~/.cache`` when unset), where caches live on Linux."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdqueue" / "cpu-choices.json"


def resolve_path(value: str | Path | None) -> Path | None:
    """The store's file for a setting's value: empty or unset = the default file, ``off`` = no store."""
    text = "" if value is None else str(value).strip()
    if text.lower() == OFF:
        return None
    return Path(text).expanduser() if text else default_path()


def machine_signature() -> str:
    """What the choices depend on besides the network: CPU model and flags, PyTorch build, ISA caps, threads."""
    cpu = first_processor()
    caps = [f"{name}={os.environ.get(name, '')}" for name in
            ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")]
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        aten = "unknown"
    parts = [cpu.get("model name", ""), cpu.get("cpu family", ""), cpu.get("model", ""), cpu.get("flags", ""),
             torch.__version__, torch.__config__.show(), aten, *caps, str(torch.get_num_threads())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stored:
    """One stored choice and the measurement it came from."""

    path: str  # a LayerPath value
    packed_ms: float
    plain_ms: float
    layers: int


class ChoiceStore:
    """The choices file: looked up once per network and kind, written when the self-check decides a kind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signature = machine_signature()
        self._entries: dict[str, dict[str, object]] | None = None
        self._warned = False

    def key(self, network: str, dtype: torch.dtype, kind: str, shape: tuple[int, ...]) -> str:
        dims = "x".join(str(d) for d in shape)
        return f"{self.signature} {network} {str(dtype).removeprefix('torch.')} {kind} {dims}"

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self._warn(f"cannot read {self.path} ({e}); measuring instead")
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("choices"), dict):
            return {}  # another version's file: its choices are measured again and the file rewritten
        return {k: v for k, v in data["choices"].items() if isinstance(v, dict)}

    def get(self, key: str) -> Stored | None:
        if self._entries is None:
            self._entries = self._read()
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            stored = Stored(str(entry["path"]), float(str(entry["packed_ms"])), float(str(entry["plain_ms"])),
                            int(str(entry["layers"])))
        except (KeyError, ValueError):
            return None
        return stored if stored.path in ("packed", "plain") else None

    def put(self, key: str, stored: Stored) -> None:
        """Add one choice to the file (re-read first, so other processes' entries are kept)."""
        entries = self._read()
        entries[key] = {"path": stored.path, "packed_ms": round(stored.packed_ms, 3),
                        "plain_ms": round(stored.plain_ms, 3), "layers": stored.layers,
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._entries = entries
        text = json.dumps({"version": VERSION, "choices": entries}, indent=1, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".cpu-choices-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            self._warn(f"cannot write {self.path} ({e}); the next start measures again")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("CPU self-check store: %s", message)
