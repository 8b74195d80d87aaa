"""Scaled dot-product attention for the UNet and the VAE, with a faster path for bf16 on CPUs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Scores held at once by the CPU bf16 path: bounds its memory (64 MiB of bf16) at any image size and batch.
SCORE_ELEMENTS = 32 * 1024 * 1024


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, *,
    upcast: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, heads, N, d], k and v [B, heads, M, d] -> [B, heads, N, d].

    ``key_mask`` [B, M] bool: the keys each batch row may attend to (None = all), so rows with shorter text
    contexts than their batch mates attend only to their own.

    ``F.scaled_dot_product_attention`` everywhere but bf16 on the CPU, where PyTorch's flash kernel runs no faster
    than in fp32: two bf16 matrix products (oneDNN) with the softmax between them measured 2x to 3.5x faster at
    the UNet's and the VAE's shapes. The query rows go in chunks, so the score matrix never outgrows SCORE_ELEMENTS.

    ``upcast``: the scores q·k^T in fp32 (a UNet config's ``upcast_attention``, SD 2.x). SDPA already holds them
    in fp32 for fp16 and bf16 inputs (its flash and memory-efficient kernels accumulate in fp32; its math kernel
    converts q, k and v to fp32 unless ``allow_fp16_bf16_reduction_math_sdp`` is set), so fp16 never overflows
    there. Only the bf16 CPU path stores scores in bf16 (8 mantissa bits: large scores lose the softmax), and with
    ``upcast`` it gives way to SDPA.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or upcast:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    B, H, N, D = q.shape
    M = k.shape[2]
    q = q.reshape(B * H, N, D) * D**-0.5
    k_t = k.reshape(B * H, M, D).transpose(1, 2)
    v = v.reshape(B * H, M, D)
    rows = max(1, SCORE_ELEMENTS // (B * H * M))
    hidden = None if key_mask is None else ~key_mask[:, None, None, :].expand(B, H, 1, M).reshape(B * H, 1, M)
    chunks = []
    for start in range(0, N, rows):
        scores = torch.bmm(q[:, start : start + rows], k_t)
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        chunks.append(torch.bmm(scores.softmax(dim=-1), v))  # softmax accumulates in fp32
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    return out.view(B, H, N, D)
