"""Tokenizer folders in every layout transformers writes or has written, against transformers' CLIPTokenizer (what
diffusers' StableDiffusionPipeline loads from ``tokenizer/``) on the same folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer, CLIPTokenizerFast

from model.tokenizer import ClipTokenizer
from tests.model.saved_pipeline import as_slow_tokenizer_folder, clip_tokenizer
from tests.model.test_tokenizer import TRICKY_PROMPTS

PROMPTS = [
    *TRICKY_PROMPTS,
    "<|STARTOFTEXT|> upper-case special tokens <|EndOfText|>",
    "a photo of <cat-toy>, a<cat-toy>b, <CAT-TOY> and <cat-toy><cat-toy>",
    "word " * 76,  # 76 tokens: one over
    "word " * 75,  # exactly 75: nothing cut
]
LAYOUTS = ["tokenizer.json", "vocab+merges", "both"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer/ as StableDiffusionPipeline.save_pretrained writes it: the tokenizer's own save_pretrained."""
    folder = tmp_path_factory.mktemp("saved-tokenizer")
    clip_tokenizer().save_pretrained(folder)
    return folder


def in_layout(source: Path, target: Path, layout: str) -> Path:
    shutil.copytree(source, target)
    if layout != "tokenizer.json":
        as_slow_tokenizer_folder(target, keep_tokenizer_json=layout == "both")
    return target


def diffusers_ids(folder: Path, prompts: list[str]) -> torch.Tensor:
    """The ids diffusers' encode_prompt computes: padded and truncated to the tokenizer's model_max_length."""
    rows = []
    for cls in {CLIPTokenizer, CLIPTokenizerFast}:  # one class since transformers 5
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
        rows.append(tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids)
    assert all(torch.equal(row, rows[0]) for row in rows)
    return rows[0]


def test_transformers_5_writes_tokenizer_json_only(saved: Path) -> None:
    """The layout that broke loading: no vocab.json / merges.txt next to tokenizer.json."""
    assert {p.name for p in saved.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    merges = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges[0] == ["i", "n"]  # pairs, not the "i n" strings of older files


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_match_diffusers_in_every_layout(saved: Path, tmp_path: Path, layout: str) -> None:
    folder = in_layout(saved, tmp_path / "tokenizer", layout)
    expected = diffusers_ids(folder, PROMPTS)
    assert expected.shape == (len(PROMPTS), 77) and (expected[:, 0] == 49406).all()
    ours = ClipTokenizer.from_folder(folder).tokenize(PROMPTS)
    assert torch.equal(ours.input_ids, expected)
    assert ours.truncated[-2:] == [True, False]


def test_merges_written_as_strings_by_older_tokenizers(saved: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved, tmp_path / "strings")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert torch.equal(ClipTokenizer.from_folder(folder).tokenize(PROMPTS).input_ids, diffusers_ids(folder, PROMPTS))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pad_token_and_length_come_from_the_folder(saved: Path, tmp_path: Path, layout: str) -> None:
    """SD 2.x folders pad with "!" (id 0); a shorter model_max_length shortens every row, as in diffusers."""
    source = tmp_path / "source"
    CLIPTokenizer.from_pretrained(saved, pad_token="!", model_max_length=64).save_pretrained(source)
    folder = in_layout(source, tmp_path / "tokenizer", layout)
    expected = diffusers_ids(folder, PROMPTS)
    assert expected.shape == (len(PROMPTS), 64) and expected[0, 7:].tolist() == [0] * 57
    ours = ClipTokenizer.from_folder(folder)
    assert (ours.pad_id, ours.max_length) == (0, 64)
    assert torch.equal(ours.tokenize(PROMPTS).input_ids, expected)


def test_folder_without_model_max_length_gets_77(saved: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers then reports a length of 1e30, which diffusers would pad to; CLIP's 77 positions are used."""
    folder = shutil.copytree(saved, tmp_path / "tokenizer")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert CLIPTokenizer.from_pretrained(folder).model_max_length > 10**29
    ours = ClipTokenizer.from_folder(folder)
    assert ours.max_length == 77 and "sets no model_max_length; using 77" in caplog.text
    assert torch.equal(ours.tokenize(PROMPTS).input_ids, diffusers_ids(saved, PROMPTS))
    ours.save_folder(tmp_path / "saved-again")
    assert ClipTokenizer.from_folder(tmp_path / "saved-again").max_length == 77


@pytest.mark.parametrize("layout", LAYOUTS)
def test_added_tokens_match_diffusers(saved: Path, tmp_path: Path, layout: str) -> None:
    """A folder saved after adding tokens (textual inversion) keeps them beyond the BPE vocabulary."""
    source = tmp_path / "source"
    tokenizer = CLIPTokenizer.from_pretrained(saved)
    tokenizer.add_tokens(["<cat-toy>", "<other>"])
    tokenizer.save_pretrained(source)
    folder = in_layout(source, tmp_path / "tokenizer", layout)
    expected = diffusers_ids(folder, PROMPTS)
    assert (expected == 49408).sum() == 5  # every spelling of <cat-toy> in the prompt, upper case included
    ours = ClipTokenizer.from_folder(folder)
    assert ours.vocab_size == 49410
    assert torch.equal(ours.tokenize(PROMPTS).input_ids, expected)


def test_own_writer_keeps_pad_length_and_added_tokens(saved: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    tokenizer = CLIPTokenizer.from_pretrained(saved, pad_token="!", model_max_length=64)
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(source)
    ClipTokenizer.from_folder(source).save_folder(tmp_path / "ours")
    assert torch.equal(ClipTokenizer.from_folder(tmp_path / "ours").tokenize(PROMPTS).input_ids,
                       diffusers_ids(tmp_path / "ours", PROMPTS))


def test_folder_without_tokenizer_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"has no vocab\.json and no tokenizer\.json"):
        ClipTokenizer.from_folder(tmp_path)
