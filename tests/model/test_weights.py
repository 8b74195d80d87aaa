"""Checkpoint loading: both layouts, architecture inference, strictness, pickles, dtypes."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model import diffusers_format
from model.single_file import infer_clip_config, infer_unet_config, infer_vae_config
from model.unet import UNetConfig, UNetModel
from model.vae import AutoencoderKL, VAEConfig
from model.weights import (
    CheckpointError,
    Components,
    load_components,
    save_random_checkpoint,
    save_single_file,
    tiny_configs,
)
from tests.model.conftest import DiffusersModel

Tensors = dict[str, torch.Tensor]


def read(path: Path) -> tuple[Tensors, dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(path), metadata


def rewrite(source: Path, target: Path, edit: Callable[[Tensors], None], keep_metadata: bool = True) -> Path:
    tensors, metadata = read(source)
    edit(tensors)
    save_file(tensors, target, metadata=metadata if keep_metadata else None)
    return target


def same_outputs(a: Components, b: Components) -> bool:
    """Equal to float rounding: identical weights can still take differently vectorised paths (memory alignment)."""
    return all(torch.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(outputs(a), outputs(b), strict=True))


def outputs(c: Components) -> list[torch.Tensor]:
    torch.manual_seed(0)
    ctx = torch.randn(1, 77, c.unet_config.context_dim)
    x = torch.randn(1, c.unet_config.in_channels, 8, 8)
    ids = torch.arange(49400, 49408).repeat(10)[None, : c.text_encoder.config.max_position_embeddings]
    with torch.no_grad():
        return [c.unet(x, torch.tensor([500]), ctx), c.vae.decode(torch.randn(1, 4, 8, 8)),
                c.vae.encode(torch.rand(1, 3, 32, 32)).mean, c.text_encoder(input_ids=ids).last_hidden_state]


def test_random_checkpoint_round_trip(tiny_checkpoint: Path) -> None:
    unet_config, vae_config, _ = tiny_configs()
    c = load_components(tiny_checkpoint)
    assert (c.unet_config, c.vae_config) == (unet_config, vae_config)  # inferred from shapes (+ recorded heads)
    assert c.text_encoder.config.num_attention_heads == 4 and c.text_encoder.config.num_hidden_layers == 2
    assert (c.scaling_factor, c.tokenizer_dir, c.scheduler_config, c.is_inpaint) == (0.18215, None, None, False)
    file, _ = read(tiny_checkpoint)
    ours = {f"model.diffusion_model.{k}": v for k, v in c.unet.state_dict().items()}
    ours |= {f"first_stage_model.{k}": v for k, v in c.vae.state_dict().items()}
    assert all(torch.equal(v, file[k]) for k, v in ours.items())
    assert not c.unet.training and not any(p.requires_grad for p in c.unet.parameters())
    assert all(o.std() > 0.01 for o in outputs(c))  # random weights still give input-dependent outputs
    assert same_outputs(c, load_components(tiny_checkpoint))


def test_same_seed_same_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = save_random_checkpoint(tmp_path / "again.safetensors", *tiny_configs(), seed=0)
    other = save_random_checkpoint(tmp_path / "other.safetensors", *tiny_configs(), seed=1)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(read(again)[0][key], read(tiny_checkpoint)[0][key])
    assert not torch.equal(read(other)[0][key], read(tiny_checkpoint)[0][key])


def test_diffusers_folder_and_its_single_file_give_the_same_outputs(
    diffusers_model: DiffusersModel, tmp_path: Path
) -> None:
    folder = load_components(diffusers_model.folder)
    unet_config, vae_config, clip_config = diffusers_model.configs
    assert (folder.unet_config, folder.vae_config) == (unet_config, vae_config)
    assert folder.scheduler_config is not None and folder.scheduler_config["beta_schedule"] == "scaled_linear"
    single = load_components(save_single_file(folder, tmp_path / "converted.safetensors"))
    assert (single.unet_config, single.vae_config) == (unet_config, vae_config)
    assert single.text_encoder.config.max_position_embeddings == clip_config.max_position_embeddings
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae), (folder.text_encoder, single.text_encoder)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert same_outputs(folder, single)


def test_rename_tables_cover_diffusers_modules_one_to_one(diffusers_model: DiffusersModel) -> None:
    unet_config, vae_config, _ = diffusers_model.configs
    with torch.device("meta"):
        ours = {"unet": UNetModel(unet_config).state_dict(), "vae": AutoencoderKL(vae_config).state_dict()}
    tables = {"unet": diffusers_format.unet_renames(unet_config), "vae": diffusers_format.vae_renames(vae_config)}
    for name, reference in (("unet", diffusers_model.unet), ("vae", diffusers_model.vae)):
        renamed = {k: diffusers_format.rename(k, tables[name]) for k in reference.state_dict()}
        assert sorted(renamed.values()) == sorted(ours[name])  # type: ignore[type-var]
        back = diffusers_format.inverted(tables[name])
        assert all(diffusers_format.rename(v, back) == k for k, v in renamed.items() if v is not None)


def test_sd15_architecture_inferred_from_shapes() -> None:
    """The real SD 1.5 (and 1.5-inpainting) key and shape sets give back the default configs."""
    with torch.device("meta"):
        for in_channels in (4, 9):
            unet = UNetModel(UNetConfig(in_channels=in_channels))
            shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
            assert infer_unet_config(shapes, {}) == UNetConfig(in_channels=in_channels)
        vae_shapes = {k: tuple(v.shape) for k, v in AutoencoderKL().state_dict().items()}
    assert infer_vae_config(vae_shapes) == VAEConfig()
    clip: dict[str, tuple[int, ...]] = {
        "embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
        "encoder.layers.0.mlp.fc1.weight": (3072, 768),
    }
    clip |= {f"encoder.layers.{i}.layer_norm1.weight": (768,) for i in range(12)}
    config = infer_clip_config(clip, {})
    assert (config.num_attention_heads, config.num_hidden_layers, config.hidden_act) == (12, 12, "quick_gelu")


def test_heads_default_to_sd1_without_metadata(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Head counts are not in tensor shapes: files from other tools get SD 1.x's 8 UNet heads."""
    bare = rewrite(tiny_checkpoint, tmp_path / "bare.safetensors", lambda t: None, keep_metadata=False)
    c = load_components(bare)
    assert c.unet_config == replace(tiny_configs()[0], num_heads=8)
    assert c.text_encoder.config.num_attention_heads == 1  # CLIP's one head per 64 channels, at least one


def test_inpainting_unet_detected(tiny_inpaint_checkpoint: Path) -> None:
    c = load_components(tiny_inpaint_checkpoint)
    assert c.is_inpaint and c.unet_config.in_channels == 9
    assert c.unet.state_dict()["input_blocks.0.0.weight"].shape[1] == 9


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda t: t.pop("model.diffusion_model.out.2.bias"), "missing (1):\n    model.diffusion_model.out.2.bias"),
        (lambda t: t.update({"model.diffusion_model.extra.weight": torch.zeros(2)}),
         "unexpected (1):\n    model.diffusion_model.extra.weight"),
        (lambda t: t.update({"lora_unet_down.alpha": torch.zeros(1)}), "unexpected (1):\n    lora_unet_down.alpha"),
        (lambda t: t.update({"first_stage_model.decoder.conv_out.bias": torch.zeros(4)}),
         "wrong shape (1):\n    first_stage_model.decoder.conv_out.bias: checkpoint [4], network [3]"),
        (lambda t: t.pop("cond_stage_model.transformer.text_model.final_layer_norm.weight"),
         "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
    ],
    ids=["missing", "unexpected", "unknown-prefix", "wrong-shape", "missing-text"],
)
def test_mismatched_tensors_are_named(
    tiny_checkpoint: Path, tmp_path: Path, edit: Callable[[Tensors], None], complaint: str
) -> None:
    broken = rewrite(tiny_checkpoint, tmp_path / "broken.safetensors", edit)
    with pytest.raises(CheckpointError, match=re.escape(complaint)):
        load_components(broken)


def test_many_mismatches_are_counted_and_truncated(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def drop_vae_decoder(t: Tensors) -> None:
        for key in [k for k in t if k.startswith("first_stage_model.decoder.up.")]:
            del t[key]

    broken = rewrite(tiny_checkpoint, tmp_path / "broken.safetensors", drop_vae_decoder)
    with pytest.raises(CheckpointError, match=r"missing \(\d{2,}\):(\n    \S+){20}\n    \.\.\. and \d+ more"):
        load_components(broken)


def test_missing_network_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def drop_vae(t: Tensors) -> None:
        for key in [k for k in t if k.startswith("first_stage_model.")]:
            del t[key]

    with pytest.raises(CheckpointError, match=r"first_stage_model\.encoder\.conv_in\.weight is missing"):
        load_components(rewrite(tiny_checkpoint, tmp_path / "unet-only.safetensors", drop_vae))


def test_training_leftovers_and_older_layouts_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Schedule buffers, EMA copies, VAE loss weights and position ids are skipped; VAE attention stored as linear
    [C, C] and CLIP keys without the text_model level (older checkpoints) are accepted."""

    def age(t: Tensors) -> None:
        t |= {"alphas_cumprod": torch.ones(1000), "betas": torch.ones(1000), "model_ema.decay": torch.ones(()),
              "model_ema.diffusion_modelout2bias": torch.ones(4), "first_stage_model.loss.logvar": torch.ones(()),
              "cond_stage_model.transformer.embeddings.position_ids": torch.arange(77)[None]}
        for key in [k for k in t if re.search(r"attn_1\.(q|k|v|proj_out)\.weight", k)]:
            t[key] = t[key][:, :, 0, 0]
        for key in [k for k in t if k.startswith("cond_stage_model.transformer.text_model.")]:
            t[key.replace("text_model.", "")] = t.pop(key)

    old = load_components(rewrite(tiny_checkpoint, tmp_path / "old.safetensors", age))
    assert same_outputs(old, load_components(tiny_checkpoint))


def test_pickle_refused_unless_allowed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_checkpoint), "global_step": 470000}, ckpt)
    with pytest.raises(CheckpointError, match=r"pickle.*allow_pickle=True \(CLI: --allow-pickle\)"):
        load_components(ckpt)
    c = load_components(ckpt, allow_pickle=True)
    assert c.unet_config == replace(tiny_configs()[0], num_heads=8)  # pickles carry no head metadata
    assert torch.equal(c.vae.decoder.conv_out.weight, load_components(tiny_checkpoint).vae.decoder.conv_out.weight)


def test_pickle_with_python_objects_refused_even_when_allowed(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "callbacks": Path("x")}, ckpt)
    with pytest.raises(CheckpointError, match="besides tensors"):
        load_components(ckpt, allow_pickle=True)


def test_dtypes_and_device(tiny_checkpoint: Path) -> None:
    c = load_components(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert {p.dtype for p in c.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.vae.parameters()} == {torch.float32}
    assert {p.device.type for p in c.unet.parameters()} == {"cpu"}
    with torch.no_grad():
        eps = c.unet(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1]),
                     torch.randn(1, 77, 32, dtype=torch.bfloat16))
    assert eps.dtype == torch.bfloat16 and eps.isfinite().all()


def test_diffusers_folder_strict_and_legacy_names(diffusers_model: DiffusersModel, tmp_path: Path) -> None:
    """Missing tensors are named as diffusers names them; pre-0.14 VAE attention names and a text encoder saved
    with the "text_model." level (as in published SD 1.x folders) load."""
    folder = shutil.copytree(diffusers_model.folder, tmp_path / "model")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    text_file = folder / "text_encoder" / "model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    rewrite(vae_file, vae_file, lambda t: t.update({
        re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{legacy[m[1]]}.", k): t.pop(k) for k in list(t)}))
    rewrite(text_file, text_file, lambda t: t.update({f"text_model.{k}": t.pop(k) for k in list(t)}))
    assert same_outputs(load_components(folder), load_components(diffusers_model.folder))

    rewrite(vae_file, vae_file, lambda t: t.__delitem__("decoder.up_blocks.0.resnets.1.conv2.bias"))
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n    vae/decoder\.up_blocks\.0\.resnets\.1\.conv2\.b"):
        load_components(folder)


def test_folder_problems_are_explained(diffusers_model: DiffusersModel, tmp_path: Path) -> None:
    folder = shutil.copytree(diffusers_model.folder, tmp_path / "model")
    unet_json = folder / "unet" / "config.json"
    config = json.loads(unet_json.read_text())
    unet_json.write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match="unet config: class_embed_type='timestep' is not supported"):
        load_components(folder)
    unet_json.write_text(json.dumps(config))

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin is a pickle file"):
        load_components(folder)
    assert load_components(folder, allow_pickle=True).unet_config == diffusers_model.configs[0]

    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(CheckpointError, match=r"not a diffusers model folder.*text_encoder/config\.json is missing"):
        load_components(folder)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_components(tmp_path / "nowhere.safetensors")


def test_unreadable_file_explained(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a readable \.safetensors file"):
        load_components(bad)


def test_weights_are_read_into_process_memory_not_mapped(tiny_checkpoint: Path) -> None:
    """fp32 weights kept in the file's dtype must not stay memory-mapped: mapped file pages would count in the
    worker's resident set on top of every converted copy."""
    c = load_components(tiny_checkpoint, dtype=torch.float32)
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(tiny_checkpoint) not in maps
    file, _ = read(tiny_checkpoint)
    key = "input_blocks.0.0.weight"
    assert torch.equal(c.unet.state_dict()[key], file[f"model.diffusion_model.{key}"])
    bf16 = load_components(tiny_checkpoint, dtype=torch.bfloat16)
    assert torch.equal(bf16.unet.state_dict()[key], file[f"model.diffusion_model.{key}"].bfloat16())


def test_truncated_file_explained(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load_components(cut)
