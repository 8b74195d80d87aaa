"""What a pipeline does to its networks when it runs on the CPU, each step measured on SD 1.5
(bench/model_vs_diffusers.py, BENCHMARKS.md): freed memory kept for reuse, threads from the CPU quota, and per
network either oneDNN-packed weights (where the dtype has a packed path; per layer kind the first pass keeps the
faster of packed and plain, ``model/cpu_choice.py``; in fp32 attention too, ``model/cpu_attention.py``) or, for
fp32 convolution networks, channels-last activations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from model.cpu_attention import can_use_onednn_attention, choose_attention
from model.cpu_choice import PathChooser
from model.cpu_choice_store import ChoiceStore
from model.cpu_pack import can_prepack, prepack
from model.device import keep_freed_memory
from model.threads import set_cpu_threads

log = logging.getLogger(__name__)


def tune_process() -> None:
    """The process-wide settings: the allocator keeps freed memory, threads follow the CPU quota."""
    keep_freed_memory()
    set_cpu_threads()


def tune_networks(networks: Iterable[tuple[nn.Module, torch.dtype, bool]], label: str = "",
                  store: ChoiceStore | None = None) -> list[PathChooser]:
    """(network, its dtype, whether it is a text encoder) each: packed where it can be; else fp32 UNets and VAEs
    go channels-last (about 1.4x for plain oneDNN; it slows bf16 UNets down about 2x, and text encoders have no
    convolutions). ``store`` keeps the self-check's choices across processes (``model.cpu_choice_store``).
    Returns the packed networks' self-checks."""
    choosers = []
    for network, dtype, text in networks:
        name = label + type(network).__name__
        if can_prepack(dtype):
            # Activations stay contiguous: channels_last measured no faster packed.
            chooser = PathChooser(name, store=store, dtype=dtype)
            log.info("%s: %d packable layers", name, prepack(network, chooser))
            if dtype == torch.float32 and can_use_onednn_attention():  # bf16 has a path of its own
                choose_attention(network, chooser)
            choosers.append(chooser)
        elif dtype == torch.float32 and not text:
            network.to(memory_format=torch.channels_last)  # type: ignore[call-overload,call-arg]
    return choosers
