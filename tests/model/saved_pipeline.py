"""Diffusers folders written the way people get them: by ``StableDiffusionPipeline.save_pretrained`` of the installed
diffusers and transformers, from tiny random networks of the real architectures and CLIP's real vocabulary.

The vocabulary is built here by CLIP's published recipe from the merges file in the open_clip wheel, independently
of ``model.tokenizer``, so the folder's tokenizer is transformers' own and not a copy of ours.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.requests import GenerationRequest
from model.weights import tiny_configs
from tests.model.conftest import SD15_SCHEDULER_CONFIG, random_reference_modules
from tests.model.reference import reference_scheduler

CLIP_MERGES = 49152 - 256 - 2
_SCENE = "a watercolor painting of a lighthouse on a cliff at dawn, "  # 12 CLIP tokens, the last a comma
LONG_PROMPT = _SCENE * 8  # 96 tokens: two chunks, cut after the comma closing token 72 (A1111's comma backtrack)
# Prompts whose 75-token chunks are known by construction: their text per chunk, for diffusers' prompt_embeds.
KNOWN_CHUNKS = {LONG_PROMPT: [_SCENE * 6, _SCENE * 2]}


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49,408-token vocabulary: byte symbols, the same with </w>, one token per merge, BOS, EOS."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    with gzip.open(Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz", "rt",
                   encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : CLIP_MERGES + 1]
    merges = [(a, b) for a, b in (line.split(" ") for line in lines)]
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), "<|startoftext|>",
              "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)  # type: ignore[arg-type]
    assert len(tokenizer) == 49408
    return tokenizer


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of model.weights.tiny_configs() with random weights, every norm perturbed."""
    unet, vae, text_encoder = random_reference_modules(tiny_configs(), seed)
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, seed: int = 0, **save_kwargs: Any) -> Path:
    """``tiny_pipeline(seed).save_pretrained(folder, **save_kwargs)`` (e.g. ``variant=``, ``max_shard_size=``)."""
    tiny_pipeline(seed).save_pretrained(folder, **save_kwargs)
    return folder


def diffusers_pixels(folder: Path, req: GenerationRequest) -> np.ndarray:
    """What diffusers draws from ``folder`` for ``req``, one CPU generator per image (our noise convention)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = reference_scheduler(req.sampler, req.karras)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.n)]
    texts: dict[str, Any] = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}
    if req.prompt in KNOWN_CHUNKS or req.negative_prompt in KNOWN_CHUNKS:  # A1111's chunks, as diffusers embeddings
        cond, uncond = (KNOWN_CHUNKS.get(t, [t]) for t in (req.prompt, req.negative_prompt))
        count = max(len(cond), len(uncond))
        texts = {"prompt_embeds": chunk_embeds(pipe, cond + [""] * (count - len(cond))),
                 "negative_prompt_embeds": chunk_embeds(pipe, uncond + [""] * (count - len(uncond)))}
    out = pipe(**texts, num_inference_steps=req.steps,
               guidance_scale=req.guidance_scale, num_images_per_prompt=req.n, generator=generators,
               height=req.height, width=req.width, output_type="np")
    return np.round(out.images * 255).astype(np.int16)


def chunk_embeds(pipe: StableDiffusionPipeline, chunks: list[str]) -> torch.Tensor:
    """[1, 77 * len(chunks), D]: each chunk's text through diffusers' tokenizer (77 ids) and text encoder, joined."""
    ids = pipe.tokenizer(chunks, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert all((row == 49407).any() for row in ids[:, 1:])  # every chunk fits: nothing is cut
    with torch.no_grad():
        z = pipe.text_encoder(ids).last_hidden_state  # [chunks, 77, D]
    return z.reshape(1, -1, z.shape[-1])


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.int16) for i in images])


def as_slow_tokenizer_folder(tokenizer_dir: Path, keep_tokenizer_json: bool = False) -> None:
    """Rewrite a tokenizer/ folder as transformers 4's slow CLIPTokenizer saved it (the layout of the published
    SD 1.x folders): vocab.json, merges.txt, special_tokens_map.json, a tokenizer_config.json with AddedToken
    dicts, added_tokens.json for tokens beyond the vocabulary. tokenizer.json is removed unless kept (transformers
    4's fast tokenizer wrote both)."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))

    def added(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "unk_token": added("<|endoftext|>"), "pad_token": config.get("pad_token", "<|endoftext|>")}
    slow_config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": config["model_max_length"], "name_or_path": "openai/clip-vit-large-patch14",
                   "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
                   **special}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(slow_config, indent=2), encoding="utf-8")
    (tokenizer_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    extra = {t["content"]: t["id"] for t in data["added_tokens"] if t["content"] not in vocab}
    if extra:
        (tokenizer_dir / "added_tokens.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
    if not keep_tokenizer_json:
        (tokenizer_dir / "tokenizer.json").unlink()
