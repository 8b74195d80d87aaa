"""The CPU start-up self-check: per layer kind, pre-packed oneDNN weights or plain PyTorch, whichever is faster here.

Whether packing pays depends on the CPU and on the kernel oneDNN selects for it (on an AVX2-only CPU a packed fp32
linear layer can lose to MKL's plain one), so no choice is made in advance. On a network's first pass each packed
layer runs both ways on the real input and adds both times to its kind's totals, until the kind's totals reach
``MEASURE_BUDGET_S`` or the pass ends (a layer's second call); then the kind takes the path with the smaller total,
logged once per network and kind, and its other layers follow without measuring. A kind that is not faster packed
so runs plain, and no CPU runs slower than plain PyTorch by more than the self-check's noise. The budget, and at
most ``MEASURE_LAYERS`` layers per kind, bound the self-check's cost (each measured layer runs six times) to a
few seconds per network at any image size. With a ``ChoiceStore`` (``model.cpu_choice_store``) each decision is
kept on disk under the machine, network, dtype and input shape, and a later process with the same key takes it
without measuring.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch

from model.cpu_choice_store import ChoiceStore, Stored

log = logging.getLogger(__name__)

MEASURE_BUDGET_S = 0.25  # measured seconds (both paths) after which a kind is decided
MEASURE_LAYERS = 12  # layers measured at most per kind (small layers would take a whole pass to fill the budget)


class LayerPath(str, Enum):
    PACKED = "packed"
    PLAIN = "plain"


def faster(packed_s: float, plain_s: float) -> LayerPath:
    """The path with the smaller measured time; plain on a tie (it needs no extra weight copy)."""
    return LayerPath.PACKED if packed_s < plain_s else LayerPath.PLAIN


@dataclass
class Totals:
    """Seconds summed over the layers of one kind measured on the first pass."""

    packed_s: float = 0.0
    plain_s: float = 0.0
    layers: int = 0


@dataclass
class PathChooser:
    """The per-kind choice for one network (UNet, VAE, text encoder): measured first, then fixed."""

    network: str
    budget_s: float = MEASURE_BUDGET_S
    max_layers: int = MEASURE_LAYERS
    store: ChoiceStore | None = None
    dtype: torch.dtype = torch.float32
    totals: dict[str, Totals] = field(default_factory=dict)
    decided: dict[str, LayerPath] = field(default_factory=dict)
    first_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # input of each kind's first layer

    def known(self, kind: str, shape: tuple[int, ...]) -> bool:
        """True when ``kind``'s path is fixed: decided in this process, or found in the store (looked up with
        the input shape of the kind's first layer, the shape its measurement would start from)."""
        if kind in self.decided:
            return True
        if kind in self.first_shape:
            return False
        self.first_shape[kind] = tuple(shape)
        if self.store is None:
            return False
        stored = self.store.get(self._key(kind))
        if stored is None:
            return False
        self.decided[kind] = LayerPath(stored.path)
        log.info("%s %s layers: %s (stored in %s: measured on %d layers: packed %.1f ms, plain %.1f ms; %s)",
                 self.network, kind, stored.path, self.store.path, stored.layers, stored.packed_ms, stored.plain_ms,
                 cpu_isa())
        return True

    def _key(self, kind: str) -> str:
        assert self.store is not None
        return self.store.key(self.network, self.dtype, kind, self.first_shape[kind])

    def settle_measured(self) -> bool:
        """Fix the path of every kind measured so far; True when a pass has run through the network (so from now on
        no layer of a measured kind measures again). A kind no pass has reached stays open."""
        for kind in list(self.totals):
            self.decide(kind)
        return bool(self.first_shape)

    def record(self, kind: str, packed_s: float, plain_s: float) -> None:
        t = self.totals.setdefault(kind, Totals())
        t.packed_s += packed_s
        t.plain_s += plain_s
        t.layers += 1

    def decide(self, kind: str) -> LayerPath:
        """The path for ``kind``, chosen from its totals on first asking and then kept."""
        if kind in self.decided:
            return self.decided[kind]
        t = self.totals.get(kind, Totals())
        path = faster(t.packed_s, t.plain_s)
        self.decided[kind] = path
        log.info("%s %s layers: %s (measured on %d layers: packed %.1f ms, plain %.1f ms; %s)",
                 self.network, kind, path.value, t.layers, 1e3 * t.packed_s, 1e3 * t.plain_s, cpu_isa())
        if self.store is not None and t.layers and kind in self.first_shape:
            self.store.put(self._key(kind), Stored(path.value, 1e3 * t.packed_s, 1e3 * t.plain_s, t.layers))
        return path

    def measure(self, kind: str, packed: Callable[[], torch.Tensor], plain: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run both paths on the same input: once each untimed (oneDNN creates and caches its kernels on a first
        call, and a packed layer packs then), then twice each timed, in the order plain, packed, packed, plain, and
        record each path's faster time (a time slice lost to another process on a shared machine, which a single
        timing would count, rarely hits both). Returns the packed output."""
        packed()
        plain()
        times: dict[str, list[float]] = {"packed": [], "plain": []}
        out = None
        for name, run in (("plain", plain), ("packed", packed), ("packed", packed), ("plain", plain)):
            start = time.perf_counter()
            result = run()
            times[name].append(time.perf_counter() - start)
            if name == "packed":
                out = result
        assert out is not None
        self.record(kind, min(times["packed"]), min(times["plain"]))
        t = self.totals[kind]
        if t.packed_s + t.plain_s >= self.budget_s or t.layers >= self.max_layers:
            self.decide(kind)
        return out


class Chooses(Protocol):
    """A layer under the self-check: its network's chooser, its path once fixed, whether it measured."""

    chooser: PathChooser | None
    path: LayerPath | None
    measured: bool

    def settle(self, path: LayerPath) -> None: ...

    def after_measuring(self) -> None: ...


def chosen_call(layer: Chooses, kind: str, shape: tuple[int, ...], packed: Callable[[], torch.Tensor],
                plain: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One call of ``layer``: while its kind is open, its first call measures both paths (unless the kind is
    known: decided here, or stored) and a later call settles the layer on the kind's decision; then the settled
    path runs."""
    if layer.path is None:
        assert layer.chooser is not None
        if not layer.measured and not layer.chooser.known(kind, shape):
            layer.measured = True
            out = layer.chooser.measure(kind, packed, plain)
            layer.after_measuring()
            return out
        layer.settle(layer.chooser.decide(kind))  # a second call: the network's first pass is done
    return packed() if layer.path is LayerPath.PACKED else plain()


def cpu_isa() -> str:
    """The instruction sets in force: ATen's kernels' (e.g. AVX512, AVX2), and oneDNN's and MKL's caps if set."""
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        aten = "unknown"
    caps = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
            if os.environ.get(name)]
    return ", ".join([f"ATen {aten}", *caps])
