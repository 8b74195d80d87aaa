"""LoRA files: reading kohya / A1111 and diffusers / PEFT ``.safetensors`` onto our layers, and a cache of them.

A LoRA adds ``up @ down * alpha / rank`` to a layer's weight; here it is never merged, but run beside the layer
(``model.lora_rows``), so jobs with different LoRAs share a batch. What each format stores, per layer:

- kohya / A1111: ``{name}.lora_down.weight`` [r, in] (conv: [r, in, kh, kw]), ``{name}.lora_up.weight``
  [out, r] (conv: [out, r, 1, 1]), optionally ``{name}.alpha``: the layer's scale is alpha / r, 1 without alpha.
- diffusers / PEFT: ``{name}.lora_A.weight`` (= down; older files: ``lora.down.weight``), ``{name}.lora_B.weight``
  (= up; ``lora.up.weight``); the scale comes from the
  PEFT config diffusers writes into the file's metadata (``lora_adapter_metadata``: ``unet.r``,
  ``unet.lora_alpha``, their ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``), else 1 (diffusers' rule).

Loading is strict: a tensor that names no layer of this model, a shape that does not fit its layer, a pair with
a half missing, or a LoRA kind we do not run (DoRA, LoHa, LoKr, CP-decomposed LoCon) is an error naming the key.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from model.lora_names import LoraNames, Network, Target

log = logging.getLogger(__name__)

_KOHYA = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# PEFT's names, and the lora.down / lora.up of diffusers' files before PEFT (diffusers reads them as lora_A / lora_B)
_PEFT = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha", "lora.down.weight": "down",
         "lora.up.weight": "up"}
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and the tensor."""


@dataclass(frozen=True)
class Adapter:
    """One layer's low-rank pair, in the network's dtype and on its device."""

    target: Target
    down: torch.Tensor  # [r, in] (linear, 1x1 conv) or [r, in, kh, kw]
    up: torch.Tensor  # [out, r]
    scale: float  # alpha / r (PEFT: its config's)


@dataclass
class LoraWeights:
    """A loaded LoRA file: its adapters per network, keyed by our module path."""

    path: Path
    stamp: tuple[int, int] = (0, 0)  # the file's size and modification time when read
    unet: dict[str, Adapter] = field(default_factory=dict)
    text: dict[str, Adapter] = field(default_factory=dict)
    text2: dict[str, Adapter] = field(default_factory=dict)  # SDXL's second text encoder

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for a in (*self.unet.values(), *self.text.values(),
                                                           *self.text2.values()) for t in (a.down, a.up))

    @property
    def adapts_text(self) -> bool:
        """Whether it changes a text encoder (and so the text embeddings its requests get)."""
        return bool(self.text or self.text2)

    def adapters(self, network: Network) -> dict[str, Adapter]:
        return {"unet": self.unet, "text": self.text, "text2": self.text2}[network]


def _split(key: str) -> tuple[str, str, dict[str, str]]:
    """(layer name, suffix, the format's suffix table) of a tensor name."""
    if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        name, _, suffix = key.partition(".")
        return name, suffix, _KOHYA
    for suffix in _PEFT:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix, _PEFT
    return key, "", _PEFT


def _peft_scale(config: dict[str, Any] | None, module: str, rank: int, alpha: float | None) -> float:
    """alpha / r of one layer as PEFT computes it from the saved config (patterns match the module name's end)."""
    if alpha is not None:  # an explicit per-layer alpha (diffusers' network_alphas form)
        return alpha / rank
    if not config:
        return 1.0  # diffusers: no alphas and no config = alpha equal to each layer's rank

    def pattern(name: str, default: Any) -> Any:
        for key, value in (config.get(name) or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                return value
        return default

    r = pattern("rank_pattern", config.get("r", rank))
    lora_alpha = pattern("alpha_pattern", config.get("lora_alpha", r))
    return float(lora_alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _metadata(path: Path, raw: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    """The PEFT configs diffusers saved, per network prefix ("unet", "text_encoder")."""
    text = (raw or {}).get(_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{path}: the {_METADATA_KEY} metadata is not JSON ({exc})") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        prefix, _, name = key.partition(".")
        out.setdefault(prefix, {})[name] = value
    for prefix, config in out.items():
        if config.get("use_dora"):
            raise LoraError(f"{path}: DoRA ({prefix}.use_dora) is not supported; use a plain LoRA")
    return out


def _fit(path: Path, key: str, tensor: torch.Tensor, target: Target, part: str) -> torch.Tensor:
    """``tensor`` as the side path runs it, or LoraError naming ``key`` when it does not fit its layer."""
    shape = tuple(tensor.shape)
    if part == "up":
        ok = len(shape) in (2, 4) and shape[0] == target.out_features and shape[2:] in ((), (1, 1))
        expected = f"[{target.out_features}, rank] or [{target.out_features}, rank, 1, 1]"
        tensor = tensor.reshape(shape[0], shape[1]) if ok else tensor
    elif target.conv and target.kernel != (1, 1):
        ok = len(shape) == 4 and shape[1] == target.in_features and shape[2:] == target.kernel
        expected = f"[rank, {target.in_features}, {target.kernel[0]}, {target.kernel[1]}]"
    else:
        ok = len(shape) in (2, 4) and shape[1] == target.in_features and shape[2:] in ((), (1, 1))
        expected = f"[rank, {target.in_features}]"
        tensor = tensor.reshape(shape[0], shape[1]) if ok else tensor
    if not ok:
        raise LoraError(f"{path}: {key} has shape {list(shape)}, but layer {target.path} needs {expected}")
    return tensor


def read_lora(
    path: Path, names: LoraNames, *, device: torch.device, dtypes: dict[Network, torch.dtype]
) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file onto our layers (strict: see the module docstring)."""
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files must be .safetensors (pickles are not read)")
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # layer name -> part -> (key, tensor)
    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        configs = _metadata(path, f.metadata())
        for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            name, suffix, table = _split(key)
            part = table.get(suffix)
            if part is None:
                kind = ("DoRA" if "dora" in key or "magnitude" in key else
                        "LoHa / LoKr" if "hada_" in key or "lokr_" in key else
                        "CP-decomposed LoCon" if "lora_mid" in key else None)
                what = f"{kind} is not supported" if kind else "this is no LoRA tensor name (kohya or PEFT) we know"
                raise LoraError(f"{path}: {key}: {what}")
            if name not in names.layers:
                raise LoraError(f"{path}: {key} names no layer of this model ({name} is not a layer path in the "
                                "kohya or diffusers naming of this model's UNet or CLIP text encoders)")
            parts.setdefault(name, {})[part] = (key, f.get_tensor(key))
    weights = LoraWeights(path)
    for name, found in parts.items():
        network, target = names.layers[name]
        if "down" not in found or "up" not in found:
            (key, _), missing = next(iter(found.values())), "down" if "down" not in found else "up"
            raise LoraError(f"{path}: {key} has no {missing} matrix beside it")
        (down_key, down), (up_key, up) = found["down"], found["up"]
        down, up = _fit(path, down_key, down, target, "down"), _fit(path, up_key, up, target, "up")
        if down.shape[0] != up.shape[1]:
            raise LoraError(f"{path}: {down_key} has rank {down.shape[0]} but {up_key} rank {up.shape[1]}")
        rank = down.shape[0]
        alpha = float(found["alpha"][1].item()) if "alpha" in found else None
        if name.startswith("lora_"):
            scale = 1.0 if alpha is None else alpha / rank
        else:
            prefix, _, module = name.partition(".")
            scale = _peft_scale(configs.get(prefix), module.removeprefix("text_model."), rank, alpha)
        dtype = dtypes[network]
        adapters = weights.adapters(network)
        if target.path in adapters:
            raise LoraError(f"{path}: {down_key} adapts {target.path}, which another key of the file adapts too")
        adapters[target.path] = Adapter(target, down.to(device, dtype), up.to(device, dtype), scale)
    if not weights.unet and not weights.adapts_text:
        raise LoraError(f"{path}: holds no LoRA tensors")
    return weights


class LoraCache:
    """Loaded LoRA files, least recently used dropped first once they hold more than ``max_bytes``.

    A file is read again when its size or modification time changed. A batch keeps the weights it runs with, so
    the bound holds between batches (a batch of many large LoRAs may hold more while it runs).
    """

    def __init__(self, names: LoraNames, device: torch.device, dtypes: dict[Network, torch.dtype],
                 max_bytes: int) -> None:
        self.names, self.device, self.dtypes, self.max_bytes = names, device, dtypes, max_bytes
        self._entries: OrderedDict[Path, tuple[tuple[int, int], LoraWeights]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for _, w in self._entries.values())

    def __contains__(self, path: Path) -> bool:
        return path in self._entries

    def get(self, path: Path) -> LoraWeights:
        try:
            stat = path.stat()
        except OSError:
            raise LoraError(f"LoRA file not found: {path}") from None
        stamp = (stat.st_size, stat.st_mtime_ns)
        entry = self._entries.get(path)
        if entry is not None and entry[0] == stamp:
            self._entries.move_to_end(path)
            return entry[1]
        weights = read_lora(path, self.names, device=self.device, dtypes=self.dtypes)
        weights.stamp = stamp
        self._entries[path] = (stamp, weights)
        self._entries.move_to_end(path)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            dropped, _ = self._entries.popitem(last=False)
            log.info("LoRA cache: dropped %s (over %d MiB)", dropped.name, self.max_bytes >> 20)
        log.info("LoRA %s loaded: %d UNet and %d text encoder layers, %.1f MiB", path.name, len(weights.unet),
                 len(weights.text) + len(weights.text2), weights.nbytes / 2**20)
        return weights
