"""OpenCLIP text towers in single-file checkpoints, as ``transformers`` CLIP text models.

SD 2.x holds its text encoder (OpenCLIP ViT-H/14) under ``cond_stage_model.model.``, SDXL its second one
(ViT-bigG/14) under ``conditioner.embedders.1.model.``, both in OpenCLIP's own layout::

    token_embedding.weight                       [vocab, width]
    positional_embedding                         [positions, width]
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.attn.in_proj_weight  [3 * width, width]: q, k and v stacked (torch.nn.MultiheadAttention)
    transformer.resblocks.N.attn.in_proj_bias    [3 * width]
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_2.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}, mlp.c_proj.{weight,bias}
    ln_final.{weight,bias}
    text_projection                              [width, projection]: applied as x @ text_projection
    logit_scale                                  (contrastive training only)

The same network is a ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) with GELU instead of OpenAI CLIP's
QuickGELU and 64 channels per head. A model may use only the first layers: SD 2.x conditions on the penultimate
layer's output through the final layer norm, which is a 23-layer ``CLIPTextModel``'s ``last_hidden_state`` (as
diffusers converts SD 2.x); its file still holds the 24th layer, a known leftover here. SDXL keeps every layer and
reads ``hidden_states[-2]`` and the projected pooled output itself.

Loading: ``config_from_open_clip`` (shapes -> config), build the model, then ``open_clip_sources`` (model key ->
checkpoint tensor, the fused q/k/v read as row slices through ``TensorSlice``). Writing: ``to_open_clip``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from model.clip_config import BOS_TOKEN_ID, EOS_TOKEN_ID, state_dict_prefix
from model.single_file import CheckpointError
from model.tensor_reader import Source, TensorSlice

TextModel = CLIPTextModel | CLIPTextModelWithProjection
SD2_PREFIX = "cond_stage_model.model."  # SD 2.x: the whole text encoder
HEAD_WIDTH = 64  # OpenCLIP's channels per attention head for every text tower SD uses
PAD_TOKEN = "!"  # id 0: OpenCLIP's tokenizer pads with 0, and SD 2.x and SDXL's second tokenizer say "!"
LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature, written for the unused logit_scale
LAYERS = "transformer.resblocks."

# per resblock: OpenCLIP name -> CLIP name below encoder.layers.N. (in_proj is split, see open_clip_sources)
_LAYER_NAMES = {
    "ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOWER_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_QKV = ("q_proj", "k_proj", "v_proj")  # their order in in_proj_weight
_ALWAYS_LEFT = ("logit_scale", "attn_mask")  # attn_mask: the causal mask, which some OpenCLIP versions saved
_LAYER_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def has_open_clip(names: Iterable[str], prefix: str) -> bool:
    """Whether the checkpoint holds an OpenCLIP text tower under ``prefix``."""
    return f"{prefix}{LAYERS}0.attn.in_proj_weight" in set(names)


def uses_open_clip(config: CLIPTextConfig) -> bool:
    """Whether a CLIP text config is an OpenCLIP tower (GELU) rather than OpenAI's CLIP (QuickGELU, SD 1.x): the
    layout our checkpoint writer uses for it, and the pad token of the packaged tokenizer (``pad_token_for``)."""
    return str(config.hidden_act) == "gelu"


def pad_token_for(config: CLIPTextConfig) -> str:
    """The pad token of prompts for a text encoder without its own tokenizer folder: ``!`` (id 0) for OpenCLIP
    towers (SD 2.x, as OpenCLIP's tokenizer, A1111 and diffusers' SD 2.x folders pad), else ``<|endoftext|>``."""
    return PAD_TOKEN if uses_open_clip(config) else "<|endoftext|>"


def count_layers(names: Iterable[str], prefix: str) -> int:
    """The number of resblocks under ``prefix``."""
    start = prefix + LAYERS
    return len({n[len(start):].split(".")[0] for n in names if n.startswith(start)})


def config_from_open_clip(
    shapes: Mapping[str, tuple[int, ...]], prefix: str, layers_used: int | None = None,
    num_heads: int | None = None,
) -> CLIPTextConfig:
    """The CLIPTextConfig of the OpenCLIP text tower under ``prefix``, from tensor shapes.

    ``layers_used`` counts like a slice end: None keeps every resblock (SDXL), -1 all but the last (SD 2.x's
    penultimate layer, a 23-layer model of a 24-layer file), a positive n the first n. ``num_heads``: heads cannot
    be read from shapes; None takes OpenCLIP's rule, one per 64 channels. ``projection_dim`` is set from
    ``text_projection`` when the file has one (for ``CLIPTextModelWithProjection``).
    """
    def need(key: str) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise CheckpointError(f"cannot infer the OpenCLIP text encoder: tensor {prefix}{key} is missing")
        return shapes[prefix + key]

    vocab_size, width = need("token_embedding.weight")
    total = count_layers(shapes, prefix)
    layers = len(range(total)[:layers_used])
    if layers < 1:
        raise CheckpointError(f"the OpenCLIP text encoder under {prefix} has {total} layers; {layers_used} leaves none")
    heads = num_heads or width // HEAD_WIDTH
    if heads < 1 or width % heads:
        raise CheckpointError(f"the OpenCLIP text encoder under {prefix} is {width} wide: {heads} heads do not "
                              "divide it")
    projection = shapes.get(prefix + "text_projection")
    return CLIPTextConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=need(f"{LAYERS}0.mlp.c_fc.weight")[0],
        vocab_size=vocab_size,
        max_position_embeddings=need("positional_embedding")[0],
        projection_dim=projection[1] if projection is not None and len(projection) == 2 else width,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
    )


@dataclass
class OpenClipSources:
    """Where each tensor of a CLIP text model comes from in an OpenCLIP checkpoint."""

    sources: dict[str, Source]  # the model's state_dict key -> checkpoint tensor (or a slice of one)
    unexpected: list[str]  # checkpoint names under the prefix that are neither the model's nor known leftovers
    leftovers: list[str]  # known and unused: layers past the model's, logit_scale, text_projection without a use


def open_clip_sources(names: Iterable[str], prefix: str, model: TextModel) -> OpenClipSources:
    """Map the OpenCLIP tensors under ``prefix`` onto ``model`` (a ``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``, e.g. on the meta device), whose keys the sources use as they are.

    Each fused ``attn.in_proj_weight`` / ``in_proj_bias`` gives three sources, its q, k and v rows; the projection
    is read transposed. Resblocks past the model's ``num_hidden_layers`` are leftovers, and so is
    ``text_projection`` for a model without one.
    """
    text = state_dict_prefix(model)
    layers = int(model.config.num_hidden_layers)
    width = int(model.config.hidden_size)
    projects = "text_projection.weight" in model.state_dict()
    out = OpenClipSources({}, [], [])
    for name in names:
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):]
        layer = _LAYER_KEY.fullmatch(key)
        if key in _TOWER_NAMES:
            out.sources[text + _TOWER_NAMES[key]] = name
        elif key == "text_projection":
            if projects:
                out.sources["text_projection.weight"] = TensorSlice(name, transpose=True)
            else:
                out.leftovers.append(name)
        elif key in _ALWAYS_LEFT:
            out.leftovers.append(name)
        elif layer is None:
            out.unexpected.append(name)
        elif int(layer[1]) >= layers:
            out.leftovers.append(name)
        else:
            target = f"{text}encoder.layers.{layer[1]}."
            inside = layer[2]
            module, _, leaf = inside.rpartition(".")
            if module == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
                kind = "weight" if leaf == "in_proj_weight" else "bias"
                for i, proj in enumerate(_QKV):
                    rows = (i * width, (i + 1) * width)
                    out.sources[f"{target}self_attn.{proj}.{kind}"] = TensorSlice(name, rows=rows)
            elif module in _LAYER_NAMES:
                out.sources[f"{target}{_LAYER_NAMES[module]}.{leaf}"] = name
            else:
                out.unexpected.append(name)
    return out


def checkpoint_name(key: str, prefix: str, model: TextModel) -> str:
    """The OpenCLIP checkpoint name a model key is read from (for messages about missing tensors)."""
    key = key.removeprefix(state_dict_prefix(model))
    if key == "text_projection.weight":
        return prefix + "text_projection"
    back = {v: k for k, v in _TOWER_NAMES.items()}
    if key in back:
        return prefix + back[key]
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if match is None:
        return prefix + key
    layer, module, leaf = match.groups()
    if module.removeprefix("self_attn.") in _QKV:
        return f"{prefix}{LAYERS}{layer}.attn.in_proj_{leaf}"
    names = {v: k for k, v in _LAYER_NAMES.items()}
    return f"{prefix}{LAYERS}{layer}.{names.get(module, module)}.{leaf}"


def to_open_clip(model: TextModel, prefix: str, unused_layers: int = 0) -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors in the OpenCLIP layout under ``prefix`` (the reverse of ``open_clip_sources``),
    for writing single-file checkpoints.

    ``unused_layers`` resblocks are appended as copies of the last one, as the layers a file holds past those its
    model uses (SD 2.x: 1); ``logit_scale`` gets CLIP's initial value, and a model without a projection gets an
    identity ``text_projection``. A loader drops all three.
    """
    text = state_dict_prefix(model)
    state = {k.removeprefix(text): v.detach() for k, v in model.state_dict().items()}
    layers = int(model.config.num_hidden_layers)
    width = int(model.config.hidden_size)
    out = {prefix + k: state[v] for k, v in _TOWER_NAMES.items()}
    for n in range(layers + unused_layers):
        src, dst = f"encoder.layers.{min(n, layers - 1)}.", f"{prefix}{LAYERS}{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state[f"{src}self_attn.{p}.{leaf}"] for p in _QKV])
            for original, clip in _LAYER_NAMES.items():
                tensor = state[f"{src}{clip}.{leaf}"]
                out[f"{dst}{original}.{leaf}"] = tensor if n < layers else tensor.clone()  # files share no memory
    projection = model.state_dict().get("text_projection.weight")
    out[prefix + "text_projection"] = (projection.detach().T if projection is not None
                                       else torch.eye(width, dtype=state["final_layer_norm.weight"].dtype))
    out[prefix + "logit_scale"] = torch.tensor(LOGIT_SCALE)
    return out
