"""The offline CLIP tokenizer against transformers' CLIPTokenizer loaded from the same vocabulary."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.tokenizer import MAX_LENGTH, VOCAB_SIZE, ClipTokenizer

TRICKY_PROMPTS = [
    "a photo of a cat",
    "",
    "A PHOTO of a Cat, TRENDING on ArtStation!!!",
    "  extra   whitespace\tand\nnewlines  ",
    "masterpiece, (best quality:1.2), [blurry], {detailed}; 8k -- uhd",
    "numbers 1234567890 3.14159 1e-5 2024/01/02",
    "unicode: café naïve Ærøskøbing São Paulo Straße 東京 タワー Москва",
    "emojis 🐱🐶 🚀✨ 👩‍👩‍👧 and flags 🇯🇵",
    "it's a dog's life, they're here, we'll see, I'd go, I'm done, you've won",
    "<|startoftext|> literal special tokens <|endoftext|> inside",
    "html &amp; entities &lt;3 and ﬁ ligature, full-width ＡＢＣ１２３",
    "a" * 300,
    "a long prompt, " * 30,  # 120 tokens: cut to 75
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers tokenizer/ folder (SD 1.5's layout) built from the bundled merges by CLIP's recipe."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    bundled = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bundled, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference(tokenizer_folder: Path) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(tokenizer_folder)
    assert len(tok) == VOCAB_SIZE  # guards against transformers building a near-empty vocabulary
    return tok


def test_known_ids() -> None:
    batch = ClipTokenizer.bundled().tokenize(["a photo of a cat"])
    assert batch.input_ids.dtype == torch.long and batch.input_ids.shape == (1, MAX_LENGTH)
    assert batch.input_ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert batch.input_ids[0, 7:].tolist() == [49407] * 70
    assert batch.num_tokens == [5] and batch.truncated == [False]
    empty = ClipTokenizer.bundled().tokenize([""])  # an image task's empty prompt: BOS, EOS, padding
    assert empty.input_ids[0].tolist() == [49406] + [49407] * 76 and empty.num_tokens == [0]


def test_bundled_is_loaded_once() -> None:
    assert ClipTokenizer.bundled() is ClipTokenizer.bundled()
    assert ClipTokenizer.bundled().vocab_size == VOCAB_SIZE


def test_matches_transformers_on_tricky_prompts(reference: CLIPTokenizer, tokenizer_folder: Path) -> None:
    expected = reference(
        TRICKY_PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    for tokenizer in (ClipTokenizer.bundled(), ClipTokenizer.from_folder(tokenizer_folder)):
        assert torch.equal(tokenizer.tokenize(TRICKY_PROMPTS).input_ids, expected)


def test_long_prompt_is_cut_to_75_tokens_and_flagged() -> None:
    batch = ClipTokenizer.bundled().tokenize(["a cat " * 50, "a cat " * 37 + "a"])  # 100 and 75 content tokens
    assert batch.input_ids.shape == (2, MAX_LENGTH)
    assert batch.num_tokens == [100, 75]
    assert batch.truncated == [True, False]
    assert batch.input_ids[0, 0].item() == 49406 and batch.input_ids[0, -1].item() == 49407
    assert batch.input_ids[0, 1:-1].tolist() == [320, 2368] * 37 + [320]
    assert batch.input_ids[1].tolist() == batch.input_ids[0].tolist()  # same 75 tokens, same EOS


def test_saved_folder_loads_here_and_in_transformers(tmp_path: Path) -> None:
    ClipTokenizer.bundled().save_folder(tmp_path)
    expected = ClipTokenizer.bundled().tokenize(TRICKY_PROMPTS).input_ids
    assert torch.equal(ClipTokenizer.from_folder(tmp_path).tokenize(TRICKY_PROMPTS).input_ids, expected)
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reference) == VOCAB_SIZE
    ids = reference(TRICKY_PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    assert torch.equal(ids.input_ids, expected)


def test_folder_pad_token_is_honoured(tokenizer_folder: Path, tmp_path: Path) -> None:
    # SD 2.x tokenizers pad with "!" (id 0) instead of <|endoftext|>; transformers 4 saved it as an AddedToken.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tokenizer_folder / name).read_bytes())
    pad = {"__type": "AddedToken", "content": "!", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad, "model_max_length": 77}),
                                                    encoding="utf-8")
    ids = ClipTokenizer.from_folder(tmp_path).tokenize(["a photo of a cat"]).input_ids[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[7:] == [0] * 70
    reference = CLIPTokenizer.from_pretrained(tmp_path)
    assert reference("a photo of a cat", padding="max_length", max_length=MAX_LENGTH).input_ids == ids


def test_folder_without_merges_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"has no merges\.txt"):
        ClipTokenizer.from_folder(tmp_path)


def test_single_string_is_refused() -> None:
    with pytest.raises(TypeError, match="sequence of prompts"):
        ClipTokenizer.bundled().tokenize("a photo of a cat")
