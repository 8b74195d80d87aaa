"""CLIP's byte-level BPE tokenizer for the SD 1.x text encoder, loaded offline from local vocabulary files.

The BPE itself runs in Hugging Face ``tokenizers`` (through ``transformers.CLIPTokenizer``), built from an
in-memory vocabulary, so the ids equal what diffusers' pipelines feed the text encoder.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTokenizer

MAX_LENGTH = 77  # positions of the CLIP text encoder, BOS and EOS included
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_BUNDLED_MERGES = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of that file: 256 byte tokens, 256 end-of-word byte tokens, the
# merges and 2 special tokens make 49408.
_NUM_MERGES = 49152 - 256 - 2


@dataclass
class TokenizedBatch:
    input_ids: torch.Tensor  # [B, 77] int64: BOS, up to 75 content tokens, EOS, then pad
    num_tokens: list[int]  # content tokens per prompt before truncation (BOS/EOS not counted)
    truncated: list[bool]  # the prompt had more than 75 content tokens and was cut


class ClipTokenizer:
    """Prompts to the fixed-length id rows the CLIP text encoder takes."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN) -> None:
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"tokenizer vocabulary has no {token!r} token")
        # Pass vocab/merges as objects: from vocab_file=/merges_file= transformers 5 silently builds a 2-token
        # vocabulary. Merges must be (a, b) pairs for the tokenizers backend, whatever the annotation says.
        self._tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)  # type: ignore[arg-type]
        if len(self._tokenizer) != len(vocab):
            raise ValueError(f"tokenizer built with {len(self._tokenizer)} tokens, expected {len(vocab)}")
        self._vocab, self._merges, self._pad_token = vocab, merges, pad_token
        self.vocab_size = len(vocab)
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]

    @classmethod
    @functools.cache
    def bundled(cls) -> ClipTokenizer:
        """The CLIP vocabulary shipped in the ``open_clip_torch`` wheel (loaded once, then shared)."""
        return cls(*_vocab_from_merges(_read_bundled_merges()))

    @classmethod
    def from_folder(cls, path: Path) -> ClipTokenizer:
        """A diffusers ``tokenizer/`` folder: vocab.json, merges.txt and, optionally, tokenizer_config.json."""
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for file in (vocab_file, merges_file):
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer folder {path} has no {file.name}")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        merges = [_merge_pair(line, merges_file) for line in _merge_lines(merges_file.read_text(encoding="utf-8"))]
        return cls(vocab, merges, pad_token=_configured_pad_token(path))

    def save_folder(self, path: Path) -> None:
        """Write this vocabulary as a diffusers ``tokenizer/`` folder (for test and demo checkpoints)."""
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_LENGTH,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "pad_token": self._pad_token,
            "do_lower_case": True,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def tokenize(self, texts: Sequence[str]) -> TokenizedBatch:
        """BOS + the first 75 BPE tokens + EOS, padded to 77 (what diffusers' CLIPTokenizer call gives)."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a sequence of prompts, got a single str")
        content = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        keep = MAX_LENGTH - 2
        ids = torch.full((len(texts), MAX_LENGTH), self.pad_id, dtype=torch.long)
        for row, tokens in enumerate(content):
            kept = [self.bos_id, *tokens[:keep], self.eos_id]
            ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        return TokenizedBatch(
            input_ids=ids,
            num_tokens=[len(tokens) for tokens in content],
            truncated=[len(tokens) > keep for tokens in content],
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


def _merge_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line and not line.startswith("#version")]


def _merge_pair(line: str, source: Path) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{source}: a merge line must hold two symbols, got {line!r}")
    return parts[0], parts[1]


def _configured_pad_token(path: Path) -> str:
    """The folder's pad token (SD 2.x pads with "!"), from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if file.is_file():
            token: Any = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            if isinstance(token, str):
                return token
    return EOS_TOKEN
