"""fp32 self-attention on the CPU from oneDNN matrix products, where this machine runs them faster than SDPA.

PyTorch's CPU flash-attention kernel (``F.scaled_dot_product_attention``) does its matrix products with the BLAS
ATen is built with (MKL). On CPUs where MKL's fp32 kernels are slow (measured on an AMD EPYC Zen 5: a large fp32
``torch.mm`` at 205 GFLOP/s, oneDNN's linear at 450), attention is then the slowest part of a UNet step: 30% of
an SD 1.5 step at 512x512. ``onednn_attention`` computes the same softmax(q k^T / sqrt(d)) v per batch row and
head with oneDNN's linear primitive (k, then v^T, as the weight), over query chunks whose scores fit in the L3
cache: measured there 1.4x faster at the UNet's first level (4096 tokens, 8 heads of 40) and 2x at the VAE's
mid-block attention. Whether it pays is measured per machine, like the packed layers (``model.cpu_choice``, kind
``attention``; "packed" is this path, "plain" SDPA): the first attention layers of a network run both ways on
their real input, and the faster path is kept, logged, and stored with the other choices.

Only fp32 self-attention takes part (``eligible``): bf16 has its own path (``model.attention``), and the text
cross-attention (77 keys per prompt chunk, a key mask for prompts of different lengths) is too short to gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import attention
from model.cpu_choice import LayerPath, PathChooser, chosen_call

KIND = "attention"
MIN_KEYS = 1024  # shorter key sequences (text contexts, the UNet's deeper levels) stay on SDPA: no faster
SCORE_ELEMENTS = 4 * 1024 * 1024  # scores of one query chunk: 16 MiB of fp32, within a server CPU's L3 cache


def eligible(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and key_mask is None
            and k.shape[2] >= MIN_KEYS)


def onednn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, heads, N, d], k and v [B, heads, M, d] -> [B, heads, N, d] (a
    transposed view of a [B, N, heads, d] tensor, which is what the callers reshape it to next)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    rows = max(1, min(N, SCORE_ELEMENTS // M))
    q = q.contiguous() * D**-0.5
    out = q.new_empty(B, N, H, D)
    for b in range(B):
        for h in range(H):
            keys = k[b, h].contiguous()  # [M, d]: scores = q keys^T
            values_t = v[b, h].t().contiguous()  # [d, M]: out = p values
            for start in range(0, N, rows):
                scores = torch.ops.mkldnn._linear_pointwise(q[b, h, start : start + rows], keys, None, "none",
                                                            [], "")
                # in place: the scores are still in the cache, a new tensor would not be
                probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
                out[b, start : start + rows, h] = torch.ops.mkldnn._linear_pointwise(probs, values_t, None,
                                                                                     "none", [], "")
    return out.transpose(1, 2)


class ChosenAttention:
    """One attention layer's choice between ``onednn_attention`` and SDPA, made by its network's ``chooser``: the
    first layers measure both on their first call; a layer's second call takes the kind's decision."""

    def __init__(self, chooser: PathChooser) -> None:
        self.chooser: PathChooser | None = chooser
        self.path: LayerPath | None = None
        self.measured = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
                 *, upcast: bool = False) -> torch.Tensor:
        if not eligible(q, k, key_mask):
            return attention(q, k, v, key_mask, upcast=upcast)
        return chosen_call(self, KIND, tuple(q.shape), lambda: onednn_attention(q, k, v), lambda: attention(q, k, v))

    def settle(self, path: LayerPath) -> None:
        self.path = path

    def after_measuring(self) -> None:
        pass


def can_use_onednn_attention() -> bool:
    """True when this PyTorch build runs oneDNN's linear on fp32 and agrees with SDPA."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        q, k, v = (torch.randn(1, 2, 3, 8) for _ in range(3))
        return torch.allclose(onednn_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def choose_attention(network: nn.Module, chooser: PathChooser) -> int:
    """Give every attention layer of ``network`` (the modules with a ``cpu_attention`` slot) the measured choice;
    returns how many."""
    layers = [m for m in network.modules() if hasattr(m, "cpu_attention")]
    for module in layers:
        setattr(module, "cpu_attention", ChosenAttention(chooser))  # noqa: B010  # a plain attribute, not a Module
    return len(layers)
