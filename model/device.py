"""Choosing the device and the precision each network runs in."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from model.cpuinfo import cpu_flags

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ONEDNN_MAX_CPU_ISA values that leave oneDNN no native bf16 dot products (it then emulates bf16, slower than fp32)
ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU does bf16 matrix math natively (AMX tiles or AVX512-BF16) and oneDNN may use it: an
    ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 caps the kernels to ones without it."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_BF16:
        return False
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt() parameters, from glibc's malloc.h


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel; True when set.

    By default glibc serves each block over 32 MiB with a fresh mmap() and unmaps it when freed, so on the CPU
    every large activation is page-faulted in (and zeroed) anew at every denoising step: measured 10x slower
    SiLU on a 33 MB tensor and a quarter of the VAE decode. A worker keeps its peak memory anyway, so it loses
    nothing by keeping it mapped. Process-wide; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.info("glibc malloc keeps freed memory for reuse: %s", ok)
    return ok


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of auto, cpu, cuda, cuda:N, mps; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available")
    return torch.device(name)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``. On CUDA one pinned, non-blocking copy: a plain copy from pageable
    memory waits for the GPU to finish its queue first. Elsewhere a plain ``.to`` (the same tensor on the CPU)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Precision:
    """The dtype of each network. The VAE stays in a dtype that does not overflow (fp16 VAEs give NaNs)."""

    unet: torch.dtype
    text: torch.dtype
    vae: torch.dtype


def resolve_precision(device: torch.device, name: str = "auto") -> Precision:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
        dtype = DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("dtype float16 is not supported on CPU; use bfloat16 or float32")
        # SD's VAE overflows in fp16: decode it in fp32 (bf16 has the range and is fine).
        return Precision(dtype, dtype, torch.float32 if dtype == torch.float16 else dtype)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.float16, torch.float16, torch.bfloat16)
        return Precision(torch.float16, torch.float16, torch.float32)
    if device.type == "mps":
        return Precision(torch.float16, torch.float16, torch.float32)
    if cpu_has_fast_bf16():
        # bf16 has fp32's range, so the VAE does not overflow; measured ~2x faster than fp32 on such CPUs.
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    return Precision(torch.float32, torch.float32, torch.float32)
