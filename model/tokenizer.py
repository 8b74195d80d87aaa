"""CLIP's byte-level BPE tokenizer for the SD 1.x text encoder, loaded offline from local vocabulary files.

The BPE itself runs in Hugging Face ``tokenizers`` through ``transformers.CLIPTokenizer``, so the ids equal what
diffusers' pipelines feed the text encoder. The packaged vocabulary is built in memory; a checkpoint's
``tokenizer/`` folder is read by ``CLIPTokenizer.from_pretrained`` from its local path, the call diffusers' pipeline
makes, so every layout transformers has written loads as diffusers loads it: ``tokenizer.json`` alone (transformers
5), ``vocab.json`` + ``merges.txt`` (transformers 4's slow tokenizer, most published SD folders), or both (its fast
tokenizer), with the folder's pad token, ``model_max_length``, added tokens and special-token flags.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from model.prompts import Break, parse_prompt_attention, split_chunks

log = logging.getLogger(__name__)

MAX_LENGTH = 77  # positions of the CLIP text encoder, BOS and EOS included
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_BUNDLED_MERGES = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of that file: 256 byte tokens, 256 end-of-word byte tokens, the
# merges and 2 special tokens make 49408.
_NUM_MERGES = 49152 - 256 - 2
# transformers' model_max_length for a tokenizer saved without one (its VERY_LARGE_INTEGER)
_UNSET_MAX_LENGTH = int(1e30)


@dataclass
class TokenizedBatch:
    input_ids: torch.Tensor  # [B, max_length] int64 (77 for SD): BOS, up to max_length - 2 tokens, EOS, then pad
    num_tokens: list[int]  # content tokens per prompt before truncation (BOS/EOS not counted)
    truncated: list[bool]  # the prompt had more than max_length - 2 content tokens and was cut


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the text encoder takes it: one row of ids and one of weights per chunk."""

    ids: list[list[int]]  # per chunk, max_length ids (77 for SD): BOS, up to 75 tokens, EOS, then pad
    weights: list[list[float]]  # per chunk, max_length weights: 1 for BOS, EOS and pad
    num_tokens: int  # content tokens of the whole prompt (weight syntax and BOS / EOS not counted), before any cut
    truncated: bool  # it had more than max_chunks chunks; the ones past the limit were dropped

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for row in self.weights for w in row)


class ClipTokenizer:
    """Prompts to the fixed-length id rows the CLIP text encoder takes."""

    def __init__(self, tokenizer: CLIPTokenizer, max_length: int = MAX_LENGTH) -> None:
        """``tokenizer``: a transformers CLIPTokenizer; ``max_length``: the row length, BOS and EOS included."""
        vocab = tokenizer.get_vocab()
        for token in (BOS_TOKEN, EOS_TOKEN, tokenizer.pad_token):
            if token not in vocab:
                raise ValueError(f"tokenizer vocabulary has no {token!r} token")
        if max_length < 2:
            raise ValueError(f"model_max_length must leave room for BOS and EOS, got {max_length}")
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[tokenizer.pad_token]
        self.comma_id = vocab.get(",</w>")  # where A1111 prefers to end a full chunk

    @classmethod
    def from_vocabulary(
        cls, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN
    ) -> ClipTokenizer:
        # Pass vocab/merges as objects: from vocab_file=/merges_file= transformers 5 silently builds a 2-token
        # vocabulary. Merges must be (a, b) pairs for the tokenizers backend, whatever the annotation says.
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,  # type: ignore[arg-type]
                                  model_max_length=MAX_LENGTH)
        if len(tokenizer) != len(vocab):
            raise ValueError(f"tokenizer built with {len(tokenizer)} tokens, expected {len(vocab)}")
        return cls(tokenizer)

    @classmethod
    @functools.cache
    def bundled(cls, pad_token: str = EOS_TOKEN) -> ClipTokenizer:
        """The CLIP vocabulary shipped in the ``open_clip_torch`` wheel (loaded once per pad token, then shared).
        SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!`` (id 0; ``model.open_clip.pad_token_for``)."""
        return cls.from_vocabulary(*_vocab_from_merges(_read_bundled_merges()), pad_token=pad_token)

    @classmethod
    def from_folder(cls, path: Path) -> ClipTokenizer:
        """A diffusers ``tokenizer/`` folder: tokenizer.json, or vocab.json + merges.txt, or both (tokenizer.json
        wins, as in transformers), and tokenizer_config.json (pad token, model_max_length, added tokens)."""
        if not (path / "tokenizer.json").is_file():
            for name in ("vocab.json", "merges.txt"):  # transformers would make up merges for a lone vocab.json
                if not (path / name).is_file():
                    raise FileNotFoundError(f"tokenizer folder {path} has no {name} and no tokenizer.json; it "
                                            "needs tokenizer.json, or vocab.json and merges.txt")
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        max_length = tokenizer.model_max_length
        if max_length >= _UNSET_MAX_LENGTH:  # diffusers' own padding fails on such a folder; use CLIP's positions
            log.warning("tokenizer folder %s sets no model_max_length; using %d", path, MAX_LENGTH)
            max_length = tokenizer.model_max_length = MAX_LENGTH
        return cls(tokenizer, max_length)

    def save_folder(self, path: Path) -> None:
        """Write this tokenizer as a diffusers ``tokenizer/`` folder (for test and demo checkpoints), as
        transformers writes it."""
        self._tokenizer.save_pretrained(path)

    def tokenize(self, texts: Sequence[str]) -> TokenizedBatch:
        """BOS + the first max_length - 2 BPE tokens + EOS, padded to max_length (77 for SD): what diffusers'
        ``tokenizer(..., padding="max_length", max_length=model_max_length, truncation=True)`` gives."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a sequence of prompts, got a single str")
        content = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        keep = self.max_length - 2
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, tokens in enumerate(content):
            kept = [self.bos_id, *tokens[:keep], self.eos_id]
            ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        return TokenizedBatch(
            input_ids=ids,
            num_tokens=[len(tokens) for tokens in content],
            truncated=[len(tokens) > keep for tokens in content],
        )

    def prompt_chunks(self, text: str, max_chunks: int) -> PromptTokens:
        """``text`` with A1111's weight syntax and BREAK, in chunks of max_length - 2 tokens (``model.prompts``),
        each a full row: what A1111 feeds its text encoder. At most ``max_chunks`` chunks are kept.

        A prompt without weight syntax and of at most 75 tokens gives one row equal to ``tokenize``'s."""
        fragments = parse_prompt_attention(text)
        texts = [f[0] for f in fragments if not isinstance(f, Break)]
        ids = iter(self._tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        tokenized = [f if isinstance(f, Break) else (next(ids), f[1]) for f in fragments]
        chunks = split_chunks(tokenized, self.comma_id, self.max_length - 2)
        kept = chunks[:max_chunks]
        pad = self.max_length - 2
        return PromptTokens(
            ids=[[self.bos_id, *c.tokens, self.eos_id] + [self.pad_id] * (pad - len(c.tokens)) for c in kept],
            weights=[[1.0, *c.weights] + [1.0] * (pad - len(c.tokens) + 1) for c in kept],
            num_tokens=sum(len(c.tokens) for c in chunks),
            truncated=len(chunks) > max_chunks,
        )


def _read_bundled_merges() -> list[str]:
    spec = importlib.util.find_spec("open_clip")  # found, not imported: open_clip's __init__ needs torchvision
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        file = Path(location) / _BUNDLED_MERGES
        if file.is_file():
            with gzip.open(file, "rt", encoding="utf-8") as f:
                return f.read().split("\n")[1 : _NUM_MERGES + 1]  # line 0 is a version header
    raise FileNotFoundError(
        f"the bundled CLIP vocabulary ({_BUNDLED_MERGES} from the open_clip_torch wheel) was not found; install it "
        'without its dependencies: pip install --no-deps "open-clip-torch==3.3.0", or load a tokenizer folder'
    )


def _vocab_from_merges(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary order: the 256 byte symbols, the same with </w>, one token per merge, BOS, EOS."""
    merges = [_merge_pair(line, Path(_BUNDLED_MERGES)) for line in lines]
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"bundled CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in CLIP's vocabulary order: printable bytes, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    # Printable bytes stand for themselves; the others map, in byte order, to code points from 256 up.
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _merge_pair(line: str, source: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{source}: a merge line must hold two symbols, got {line!r}")
    return parts[0], parts[1]
