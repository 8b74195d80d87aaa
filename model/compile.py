"""``SDQ_COMPILE``: ``torch.compile`` of the UNet and the VAE decoder, each as one whole graph.

``fullgraph=True`` makes a graph break an error instead of a silent slowdown (tests/model/test_compile.py checks
the networks with ``torch._dynamo.explain``). Shapes are static (``dynamic=False``): each image size and batch size
compiles once, which is what CUDA graphs need and what the worker's warm-up (``model/warmup.py``) pays for ahead of
the first job. Past dynamo's recompile limit (``RECOMPILE_LIMIT`` shapes) a new shape runs eagerly: with
``fullgraph=True`` dynamo would raise there instead (``CompiledNetwork``).
Networks with the CPU's oneDNN-prepacked layers stay eager: dynamo cannot trace their opaque weights.

The compiled callables share the eager modules' parameters, so LoRA side paths, which change per batch, keep using
the eager UNet (``Pipeline`` picks it for batches with LoRAs) and loading or swapping weights needs no recompile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal, cast

import torch
from torch import nn

from model.cpu_pack import ChosenLayer
from model.vae import AutoencoderKL

log = logging.getLogger(__name__)

CompileMode = Literal["off", "default", "max"]
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "default", "max")
RECOMPILE_LIMIT = 64  # shapes one network may compile for: a worker serving several sizes and batch sizes


def inductor_mode(mode: CompileMode, device: torch.device) -> str:
    """torch.compile's ``mode`` for ours: max = CUDA graphs on top of the inductor's kernels (reduce-overhead), on
    CUDA; elsewhere, where there are no CUDA graphs, the same as default. Not max-autotune: its kernel search takes
    many minutes per shape, too long for a worker's warm-up."""
    return "reduce-overhead" if mode == "max" and device.type == "cuda" else "default"


def compile_network(module: nn.Module, mode: CompileMode, device: torch.device) -> Callable[..., torch.Tensor]:
    """``module`` compiled as one static-shape graph (``mode`` off: the module itself)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode == "off":
        return module
    if any(isinstance(m, ChosenLayer) for m in module.modules()):
        # oneDNN-prepacked weights (model/cpu_pack.py, the CPU's fast path) are opaque tensors dynamo cannot trace
        log.warning("%s has oneDNN-prepacked layers, which torch.compile cannot trace: it runs eagerly",
                    type(module).__name__)
        return module
    _raise_recompile_limit()
    compiled = torch.compile(module, fullgraph=True, dynamic=False, mode=inductor_mode(mode, device))
    log.info("%s: torch.compile mode=%s (compiled on first use of each shape)", type(module).__name__,
             inductor_mode(mode, device))
    return CompiledNetwork(module, cast(Callable[..., torch.Tensor], compiled))


class CompiledNetwork:
    """``compiled``, or ``module`` itself for a call dynamo refuses to compile because it has compiled too many
    shapes already (``fullgraph=True`` makes that an error rather than a silent fallback)."""

    def __init__(self, module: nn.Module, compiled: Callable[..., torch.Tensor]) -> None:
        self.module = module
        self.compiled = compiled
        self.warned = False

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not self.warned:
                log.warning("%s: compiled for too many shapes; new shapes run eagerly", type(self.module).__name__)
                self.warned = True
            return cast(torch.Tensor, self.module(*args))


def compile_decode(
    vae: AutoencoderKL, mode: CompileMode, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The VAE's ``decode`` (unscaled latents -> image) with its decoder compiled; ``post_quant_conv`` (one 1x1
    conv) stays eager. Mode off: ``vae.decode`` itself."""
    if mode == "off":
        return vae.decode
    decoder = compile_network(vae.decoder, mode, device)
    return lambda z: decoder(vae.post_quant_conv(z))


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)
