"""OpenCLIP text towers: our mapping onto transformers' CLIP text models against an OpenCLIP-layout tower built
here on ``torch.nn.MultiheadAttention`` (fused q/k/v, as OpenCLIP's ``ResidualAttentionBlock``), both ways."""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from model import open_clip
from model.single_file import HEADS_METADATA_KEY, CheckpointError
from model.tensor_reader import TensorReader, TensorSlice
from model.tokenizer import ClipTokenizer
from model.weights import load_components, save_random_checkpoint
from tests.model.saved_pipeline import clip_vocabulary
from tests.model.sd2_reference import sd2_configs

WIDTH, HEADS, LAYERS, MLP, PROJECTION = 32, 2, 3, 64, 16
SDXL_PREFIX = "conditioner.embedders.1.model."
PROMPT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"


class Block(nn.Module):
    """OpenCLIP's ResidualAttentionBlock (pre-norm, GELU MLP), its attribute names the checkpoint's."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(WIDTH, MLP), gelu=nn.GELU(), c_proj=nn.Linear(MLP, WIDTH)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(Block() for _ in range(LAYERS))


class TextTower(nn.Module):
    """OpenCLIP's text tower: token + position embeddings, causal blocks, ln_final, x @ text_projection."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(49408, WIDTH)
        self.positional_embedding = nn.Parameter(torch.empty(77, WIDTH))
        self.transformer = Transformer()
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.empty(WIDTH, PROJECTION))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # every norm and bias too, so no tensor can be swapped unnoticed
                p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if p.ndim > 1 else 0.1) + (p.ndim == 1))

    def hidden(self, ids: torch.Tensor, layers: int) -> torch.Tensor:
        """The residual stream after the first ``layers`` blocks, without the final norm."""
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((77, 77), float("-inf")).triu(1)
        for block in list(self.transformer.resblocks)[:layers]:
            x = block(x, mask)
        return x

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.ln_final(self.hidden(ids, LAYERS))
        return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ self.text_projection


def prompt_ids() -> torch.Tensor:
    rows = [PROMPT_IDS, [49406, 49407], [49406, *range(1000, 1075), 49407]]
    return torch.tensor([row + [0] * (77 - len(row)) for row in rows])


def sd2_file_with(tower_state: dict[str, torch.Tensor], tmp_path: Path) -> Path:
    """A single file of the tiny SD 2 architecture whose text encoder is ``tower_state`` (OpenCLIP names)."""
    base = save_random_checkpoint(tmp_path / "base.safetensors", *sd2_configs())
    tensors = {k: v for k, v in load_file(base).items() if not k.startswith(open_clip.SD2_PREFIX)}
    tensors |= {open_clip.SD2_PREFIX + k: v.contiguous() for k, v in tower_state.items()}
    path = tmp_path / "sd2.safetensors"
    heads = {"unet_num_heads": 8, "unet_num_head_channels": 16, "text_num_attention_heads": HEADS}
    save_file(tensors, path, metadata={"format": "pt", HEADS_METADATA_KEY: json.dumps(heads)})
    return path


def test_sd2_file_reads_the_penultimate_layer_through_the_final_norm(tmp_path: Path) -> None:
    tower = TextTower().eval()
    c = load_components(sd2_file_with(tower.state_dict(), tmp_path))
    config = c.text_encoder.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_act) == (LAYERS - 1, HEADS, "gelu")
    ids = prompt_ids()
    with torch.no_grad():
        expected = tower.ln_final(tower.hidden(ids, LAYERS - 1))
        got = c.text_encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_sdxl_style_tower_with_projection(tmp_path: Path) -> None:
    """The API as SDXL's second text encoder uses it: every layer, hidden_states[-2], the projected pooled output."""
    tower = TextTower(seed=1).eval()
    path = tmp_path / "tower.safetensors"
    save_file({SDXL_PREFIX + k: v.contiguous() for k, v in tower.state_dict().items()}, path)
    reader = TensorReader()
    with ExitStack() as stack:
        reader.add(path, stack, allow_pickle=False)
        config = open_clip.config_from_open_clip(reader.shapes, SDXL_PREFIX, num_heads=HEADS)
        assert (config.num_hidden_layers, config.projection_dim) == (LAYERS, PROJECTION)
        model = CLIPTextModelWithProjection(config).eval()
        found = open_clip.open_clip_sources(reader.shapes, SDXL_PREFIX, model)
        assert found.unexpected == [] and found.leftovers == [SDXL_PREFIX + "logit_scale"]
        assert found.sources["text_projection.weight"] == TensorSlice(SDXL_PREFIX + "text_projection", transpose=True)
        model.load_state_dict({k: reader.get(src) for k, src in found.sources.items()}, strict=True)
    ids = prompt_ids()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        assert torch.allclose(out.hidden_states[-2], tower.hidden(ids, LAYERS - 1), atol=1e-5, rtol=0)
        assert torch.allclose(out.text_embeds, tower.pooled(ids), atol=1e-5, rtol=0)


def test_to_open_clip_is_the_reverse(tmp_path: Path) -> None:
    """Our writer's tensors load strictly into the OpenCLIP-layout tower and compute what the CLIP model does."""
    _, _, text_config = sd2_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = CLIPTextModel(text_config).eval()
    tensors = open_clip.to_open_clip(model, open_clip.SD2_PREFIX, unused_layers=1)
    tower = TextTower().eval()
    state = {k.removeprefix(open_clip.SD2_PREFIX): v for k, v in tensors.items()}
    assert set(state) == set(tower.state_dict())
    assert state["text_projection"].shape == (WIDTH, WIDTH)  # a CLIPTextModel has none: an identity stands in
    missing, unexpected = tower.load_state_dict({k: v for k, v in state.items() if k != "text_projection"},
                                                strict=False)
    assert (missing, unexpected) == (["text_projection"], [])
    ids = prompt_ids()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, tower.ln_final(tower.hidden(ids, 2)),
                              atol=1e-5, rtol=0)


def test_unknown_and_missing_open_clip_tensors_are_named(tmp_path: Path) -> None:
    state = TextTower().state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected \(1\):\n    cond_stage_model\.model\.transformer\.bias"):
        load_components(sd2_file_with({**state, "transformer.bias": torch.zeros(3)}, tmp_path))
    partial = {k: v for k, v in state.items() if k != "transformer.resblocks.1.attn.in_proj_weight"}
    fused = r"cond_stage_model\.model\.transformer\.resblocks\.1\.attn\.in_proj_weight"
    with pytest.raises(CheckpointError, match=rf"missing \(1\):\n    {fused}"):
        load_components(sd2_file_with(partial, tmp_path))
    # the last resblock and logit_scale are known leftovers, never read
    last = f"transformer.resblocks.{LAYERS - 1}."
    changed = {k: v + 1 if k.startswith(last) or k == "logit_scale" else v for k, v in state.items()}
    before = load_components(sd2_file_with(state, tmp_path)).text_encoder.state_dict()
    after = load_components(sd2_file_with(changed, tmp_path)).text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_names_invert_the_sources() -> None:
    _, _, text_config = sd2_configs()
    with torch.device("meta"):
        model = CLIPTextModel(text_config)
    names = open_clip.to_open_clip(CLIPTextModel(text_config), open_clip.SD2_PREFIX)
    found = open_clip.open_clip_sources(names, open_clip.SD2_PREFIX, model)
    assert set(found.sources) == set(model.state_dict())
    for key, src in found.sources.items():
        name = src if isinstance(src, str) else src.name
        assert open_clip.checkpoint_name(key, open_clip.SD2_PREFIX, model) == name


def test_tensor_slice_rows_and_transpose() -> None:
    fused = torch.arange(24.0).reshape(6, 4)
    k = TensorSlice("w", rows=(2, 4))
    assert k.shape((6, 4)) == (2, 4) and torch.equal(k.cut(fused), fused[2:4])
    t = TensorSlice("w", transpose=True)
    assert t.shape((6, 4)) == (4, 6) and torch.equal(t.cut(fused), fused.T)


def test_bundled_tokenizer_pads_open_clip_prompts_with_zero() -> None:
    """"!" (id 0) after EOS, as diffusers' SD 2.x tokenizers and OpenCLIP pad; SD 1.x keeps EOS."""
    _, _, text_config = sd2_configs()
    tokenizer = ClipTokenizer.bundled(open_clip.pad_token_for(text_config))
    ids = tokenizer.tokenize(["a photo of a cat"]).input_ids[0].tolist()
    assert ids == PROMPT_IDS + [0] * 70
    chunks = tokenizer.prompt_chunks("a (photo:1.2) of a cat", 8)
    assert chunks.ids == [PROMPT_IDS + [0] * 70]
    vocab, merges = clip_vocabulary()
    theirs = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!")  # type: ignore[arg-type]
    assert theirs("a photo of a cat", padding="max_length", max_length=77).input_ids == ids
    assert ClipTokenizer.bundled().pad_id == 49407
