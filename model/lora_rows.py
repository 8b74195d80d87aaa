"""LoRA per batch row: each row of a UNet (or text encoder) batch gets its own request's low-rank side paths.

For a layer ``y = base(x)`` and the LoRAs of a row's request, the row gets ``y + sum_i s_i * a_i * up_i(down_i(x))``
(``s_i`` the request's scale, ``a_i`` the file's alpha / rank), exactly what merging ``W + s_i a_i up_i down_i``
would give, but without touching the base layer: a forward hook adds the delta to whatever the layer (plain or
CPU-packed) computed. The rows of one request set run as one group (one gather, two small matrix products, one
scatter-add), so the cost grows with the number of distinct LoRA sets in the batch, not with its rows, and a
row's result does not depend on its batch mates: a job's image is the same alone or beside other LoRAs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from model.lora import LoraCache, LoraError, LoraWeights
from model.lora_names import LoraNames, Network, Target
from model.requests import GenerationRequest, LoraRef
from model.unet import UNetModel

DEFAULT_CACHE_BYTES = 1024 * 2**20
LORA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class _Pair:
    target: Target
    down: torch.Tensor  # the set's downs stacked along the rank
    up: torch.Tensor  # the set's ups side by side, each scaled by its request scale x alpha / rank

    def delta(self, x: torch.Tensor, size: Any = None) -> torch.Tensor:
        t = self.target
        if not t.conv:
            return F.linear(F.linear(x, self.down), self.up)
        if t.upsample:  # the conv of an Upsample sees the interpolated map
            x = F.interpolate(x, size=size or (2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest")
        down = self.down if self.down.ndim == 4 else self.down[:, :, None, None]
        h = F.conv2d(x, down, stride=t.stride, padding=t.padding)
        return F.conv2d(h, self.up[:, :, None, None])


class RowAdapters:
    """The side paths of one network for one batch: ``rows(owners)`` installs them while the network runs."""

    def __init__(self, network: nn.Module, sets: Sequence[Sequence[tuple[LoraWeights, float]]],
                 which: Network) -> None:
        self.network = network
        self.pairs: dict[str, dict[int, _Pair]] = {}  # hook path -> set index -> pair
        for index, loras in enumerate(sets):
            by_layer: dict[str, list[tuple[torch.Tensor, torch.Tensor, Target]]] = {}
            for weights, scale in loras:
                for path, a in weights.adapters(which).items():
                    by_layer.setdefault(path, []).append((a.down, a.up * (scale * a.scale), a.target))
            for parts in by_layer.values():
                target = parts[0][2]
                pair = _Pair(target, torch.cat([d for d, _, _ in parts]), torch.cat([u for _, u, _ in parts], dim=1))
                self.pairs.setdefault(target.hook_path, {})[index] = pair

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @contextmanager
    def rows(self, owners: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """While inside, batch row ``b`` of the network gets the side paths of set ``owners[b]``."""
        if not self.pairs:
            yield
            return
        owner_list = owners.tolist() if isinstance(owners, torch.Tensor) else list(owners)
        device = next(iter(next(iter(self.pairs.values())).values())).down.device
        groups: list[tuple[int, torch.Tensor | None]] = []  # (set, its rows on the device; None = every row)
        for index in dict.fromkeys(owner_list):
            rows = [b for b, o in enumerate(owner_list) if o == index]
            groups.append((index, None if len(rows) == len(owner_list) else torch.tensor(rows, device=device)))
        handles = []
        for path, pairs in self.pairs.items():
            module = self.network.get_submodule(path)
            handles.append(module.register_forward_hook(_hook(pairs, groups), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _hook(pairs: dict[int, _Pair], groups: list[tuple[int, torch.Tensor | None]]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        size = args[1] if len(args) > 1 else kwargs.get("size")
        for index, rows in groups:
            pair = pairs.get(index)
            if pair is None:
                continue
            if rows is None:
                output.add_(pair.delta(x, size).to(output.dtype))
            else:
                output.index_add_(0, rows, pair.delta(x.index_select(0, rows), size).to(output.dtype))
        return output

    return hook


@dataclass
class LoraBatch:
    """The LoRAs of one pipeline call: per request its set, the UNet's and the text encoder's side paths."""

    unet: RowAdapters | None
    text: RowAdapters | None
    text_keys: list[str]  # per request: what its text encoder LoRAs are, for the text-embedding cache ("" = none)
    text2: RowAdapters | None = None  # SDXL's second text encoder

    @contextmanager
    def text_rows(self, owners: Sequence[int]) -> Iterator[None]:
        """While inside, both text encoders' rows get their requests' side paths."""
        with ExitStack() as stack:
            for adapters in (self.text, self.text2):
                if adapters is not None:
                    stack.enter_context(adapters.rows(owners))
            yield


NO_LORA = LoraBatch(None, None, [])


class LoraLibrary:
    """The LoRAs a pipeline can apply: files by path or by name in ``directory``, loaded through an LRU cache."""

    def __init__(self, unet: UNetModel, text_encoder: CLIPTextModel, device: torch.device,
                 dtypes: dict[Network, torch.dtype], directory: Path | None = None,
                 max_bytes: int = DEFAULT_CACHE_BYTES, text_encoder_2: CLIPTextModelWithProjection | None = None
                 ) -> None:
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.directory = directory
        self.max_bytes = max_bytes
        self._device, self._dtypes = device, dtypes
        self._cache: LoraCache | None = None

    def configure(self, directory: Path | None, max_bytes: int) -> None:
        """Where LoRAs named without a path live, and how much memory loaded ones may hold."""
        self.directory, self.max_bytes = directory, max_bytes
        if self._cache is not None:
            self._cache.max_bytes = max_bytes

    @property
    def cache(self) -> LoraCache:
        if self._cache is None:  # the name table is built on first use: it builds the networks' shapes once
            names = LoraNames.build(self.unet.config, self.text_encoder.config,
                                    None if self.text_encoder_2 is None else self.text_encoder_2.config)
            self._cache = LoraCache(names, self._device, self._dtypes, self.max_bytes)
        return self._cache

    def path(self, ref: LoraRef) -> Path:
        if ref.path is not None:
            return ref.path
        if self.directory is None:
            raise LoraError(f"lora {ref.name!r} asked for by name, but no LoRA directory is configured")
        return self.directory / f"{ref.name}{LORA_SUFFIX}"

    def load(self, ref: LoraRef) -> LoraWeights:
        return self.cache.get(self.path(ref))

    def batch(self, requests: Sequence[GenerationRequest]) -> LoraBatch:
        if not any(r.loras for r in requests):
            return NO_LORA
        sets = [[(self.load(ref), ref.scale) for ref in r.loras] for r in requests]
        unet = RowAdapters(self.unet, sets, "unet")
        text = RowAdapters(self.text_encoder, sets, "text")
        text2 = RowAdapters(self.text_encoder_2, sets, "text2") if self.text_encoder_2 is not None else None
        keys = ["|".join(f"{w.path}@{w.stamp}:{s!r}" for w, s in loras if w.adapts_text) for loras in sets]
        return LoraBatch(unet or None, text or None, keys, text2 or None)
