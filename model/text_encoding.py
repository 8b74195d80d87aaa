"""Prompts to the UNet's text context: 75-token chunks through CLIP, weighted and concatenated as A1111 does.

For each request of a batch:
  1. its prompt and negative prompt become chunks of 77 ids (``ClipTokenizer.prompt_chunks``); the one with fewer
     chunks is padded with chunks of the empty prompt, so both have the request's chunk count (A1111's "pad
     prompt/negative prompt to be same length", which diffusers needs too: its embeddings must have one shape);
  2. every chunk goes through the text encoder on its own (``EncodeRows``: the pipeline's cached, LoRA-aware call);
  3. a chunk with weights other than 1 gets A1111's emphasis: ``z * w`` per token, then scaled back to the chunk's
     original mean (``emphasize``); a chunk without weights is left exactly as the encoder gave it;
  4. the chunks are concatenated along the sequence: [77 * chunks, D].

Requests with fewer chunks than the longest of the batch are filled up to its length, and ``TextContext.mask``
marks their filler positions, which the UNet's cross-attention then ignores: a job's image does not depend on the
prompt lengths of its batch mates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core import rules
from model.tokenizer import ClipTokenizer, PromptTokens

log = logging.getLogger(__name__)

# (ids [R, 77] int64, the request owning each row) -> last hidden states [R, 77, D]
EncodeRows = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class TextContext:
    """The text context of one batch, per request (not per image)."""

    cond: torch.Tensor  # [N, L, D]: L = 77 x the largest chunk count of the batch
    uncond: torch.Tensor  # [N, L, D]
    mask: torch.Tensor | None  # [N, L] bool, True on a request's own chunks; None when all have L positions
    prompts: list[PromptTokens]
    negatives: list[PromptTokens]
    chunks: list[int]  # per request: the chunk count of its prompt and of its negative prompt


def encode_prompts(
    tokenizer: ClipTokenizer, encode_rows: EncodeRows, prompts: Sequence[str], negatives: Sequence[str],
    max_chunks: int = rules.MAX_PROMPT_CHUNKS,
) -> TextContext:
    """The conditional and unconditional text context of requests with these prompts and negative prompts."""
    n = len(prompts)
    if len(negatives) != n:
        raise ValueError(f"{n} prompts but {len(negatives)} negative prompts")
    tokens = [tokenizer.prompt_chunks(text, max_chunks) for text in [*prompts, *negatives]]
    empty = tokenizer.prompt_chunks("", 1)
    chunks = [max(len(tokens[k].ids), len(tokens[n + k].ids)) for k in range(n)]
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    owners: list[int] = []
    for i, t in enumerate(tokens):
        fill = chunks[i % n] - len(t.ids)
        ids += t.ids + empty.ids * fill
        weights += t.weights + empty.weights * fill
        owners += [i % n] * chunks[i % n]
    z = encode_rows(torch.tensor(ids, dtype=torch.long), owners)  # [rows, 77, D]
    z = emphasize(z, torch.tensor(weights, dtype=torch.float32))

    width = tokenizer.max_length
    length = width * max(chunks)
    context = z.new_zeros(2 * n, length, z.shape[-1])  # filler positions stay zero: the mask hides them
    row = 0
    for i in range(2 * n):
        count = chunks[i % n]
        context[i, : count * width] = z[row : row + count].reshape(count * width, -1)
        row += count
    mask = None
    if min(chunks) != max(chunks):
        own = torch.tensor([c * width for c in chunks], device=z.device)
        mask = torch.arange(length, device=z.device)[None] < own[:, None]
    if max(chunks) > 1:
        log.debug("text context of %d requests: %s chunks", n, chunks)
    return TextContext(context[:n], context[n:], mask, tokens[:n], tokens[n:], chunks)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis, chunk by chunk: each token's vector times its weight, then the whole chunk scaled
    so that its mean (over tokens and channels) is the unweighted one's. z [R, 77, D], weights [R, 77].

    Computed in float32; rows whose weights are all 1 are returned untouched (A1111's formula leaves them as they
    are too, up to rounding)."""
    weighted_rows = torch.nonzero((weights != 1.0).any(dim=1)).flatten().tolist()
    if not weighted_rows:
        return z
    out = z.clone()
    rows = torch.tensor(weighted_rows, device=z.device)
    original = z[rows].float()  # [r, 77, D]
    w = weights[weighted_rows].to(z.device)[..., None]  # [r, 77, 1]
    scaled = original * w
    scaled = scaled * (original.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
    out[rows] = scaled.to(z.dtype)
    return out
