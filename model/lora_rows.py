"""LoRA per batch row: each row of a UNet (or text encoder) batch gets its own request's low-rank side paths.

For a layer ``y = base(x)`` and the LoRAs of a row's request, the row gets ``y + sum_i s_i * a_i * up_i(down_i(x))``
(``s_i`` the request's scale, ``a_i`` the file's alpha / rank), exactly what merging ``W + s_i a_i up_i down_i``
would give, but without touching the base layer: a forward hook adds the delta to whatever the layer (plain or
CPU-packed) computed. A batch whose sets all have the same number of rows runs every set's pair of a linear or 1x1
layer at once (the pairs stacked, two batched matrix products); otherwise the rows of one set run as one group
(one gather, two small matrix products, one scatter-add). Either way a row's result does not depend on its batch
mates: a job's image is the same alone or beside other LoRAs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
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
        self._stacks: dict[tuple[str, tuple[int, ...]], _Stack] = {}  # built on first use, for the call's layout

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
        layout = _Layout.of(owner_list, device)
        handles = []
        for path, pairs in self.pairs.items():
            module = self.network.get_submodule(path)
            handles.append(module.register_forward_hook(self._hook(path, pairs, layout), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _stacked(self, path: str, pairs: dict[int, _Pair], order: tuple[int, ...]) -> _Stack:
        key = (path, order)
        stack = self._stacks.get(key)
        if stack is None:
            stack = self._stacks[key] = _Stack.build(pairs, order)
        return stack

    def _hook(self, path: str, pairs: dict[int, _Pair], layout: _Layout) -> Any:
        target = next(iter(pairs.values())).target
        order = layout.order if _Stack.fits(target) else None

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
                 ) -> torch.Tensor:
            x = args[0]
            if order is not None:  # every set's pair at once
                stack = self._stacked(path, pairs, order)
                if layout.perm is None:  # row b belongs to set order[b % G]: a view, no gather
                    stack.add_tiled(x, layout.k, output)
                else:
                    delta = stack.delta(x.index_select(0, layout.perm), layout.k, tiled=False)
                    output.index_add_(0, layout.perm, delta.to(output.dtype))
                return output
            size = args[1] if len(args) > 1 else kwargs.get("size")
            for index, rows in layout.groups:
                pair = pairs.get(index)
                if pair is None:
                    continue
                if rows is None:
                    output.add_(pair.delta(x, size).to(output.dtype))
                else:
                    output.index_add_(0, rows, pair.delta(x.index_select(0, rows), size).to(output.dtype))
            return output

        return hook


@dataclass(frozen=True)
class _Layout:
    """How a batch's rows fall into LoRA sets, and which way the side paths run over them.

    When every set has the same number of rows ``k`` (the usual batch: one image per job, each with its CFG row),
    the sets' pairs run together as batched matrix products over a ``[G, ...]`` stack: ``order`` = the sets,
    ``perm`` = the rows in set order, or None when row ``b`` already belongs to set ``order[b % G]``. Otherwise,
    and for the convolutions a stack does not cover, one set at a time: ``groups`` = (set, its rows; None = all).
    """

    groups: list[tuple[int, torch.Tensor | None]]
    order: tuple[int, ...] | None = None
    k: int = 1
    perm: torch.Tensor | None = None

    @staticmethod
    def of(owners: list[int], device: torch.device) -> _Layout:
        members: dict[int, list[int]] = {}
        for b, owner in enumerate(owners):
            members.setdefault(owner, []).append(b)
        groups = [(i, None if len(rows) == len(owners) else torch.tensor(rows, device=device))
                  for i, rows in members.items()]
        counts = {len(rows) for rows in members.values()}
        if len(members) < 2 or len(counts) != 1:
            return _Layout(groups)
        order, k = tuple(members), counts.pop()
        if all(owner == order[b % len(order)] for b, owner in enumerate(owners)):
            return _Layout(groups, order, k)
        perm = torch.tensor([b for rows in members.values() for b in rows], device=device)
        return _Layout(groups, order, k, perm)


@dataclass(frozen=True)
class _Stack:
    """One layer's pairs for several sets, zero-padded to one rank: ``down`` [G, R, in], ``up`` [G, out, R]."""

    conv: bool
    down: torch.Tensor
    up: torch.Tensor
    # per row count k: the pairs laid out per batch row (row b: set b % G), as add_tiled's batched products take them
    _per_row: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False)

    @staticmethod
    def fits(target: Target) -> bool:
        """A linear layer, or a 1x1 convolution that keeps the map's size (SD 1.x's transformer projections)."""
        return not target.conv or (target.kernel == (1, 1) and target.stride == (1, 1)
                                   and target.padding == (0, 0) and not target.upsample)

    @staticmethod
    def build(pairs: dict[int, _Pair], order: tuple[int, ...]) -> _Stack:
        some = next(iter(pairs.values()))
        rank = max(p.down.shape[0] for p in pairs.values())
        down = some.down.new_zeros(len(order), rank, some.target.in_features)
        up = some.up.new_zeros(len(order), some.target.out_features, rank)
        for g, index in enumerate(order):
            pair = pairs.get(index)
            if pair is not None:  # a set without this layer keeps zeros: no delta for its rows
                r = pair.down.shape[0]
                down[g, :r] = pair.down.reshape(r, -1)
                up[g, :, :r] = pair.up
        return _Stack(some.target.conv, down, up)

    def add_tiled(self, x: torch.Tensor, k: int, output: torch.Tensor) -> None:
        """``output`` += the side paths of rows ``x`` (row b: set b % G), the second product accumulating straight
        into ``output``: no delta tensor, no separate add over the layer's output."""
        if output.dtype != x.dtype or x.dtype != self.down.dtype or not output.is_contiguous():
            output.add_(self.delta(x, k, tiled=True).to(output.dtype))
            return
        rows = self._per_row.get(k)
        if rows is None:  # [B, in, R] and [B, R, out] (conv: [B, R, in] and [B, out, R]), built once per k
            g = self.down.shape[0]
            down, up = (self.down, self.up) if self.conv else (self.down.transpose(1, 2), self.up.transpose(1, 2))
            rows = self._per_row[k] = (down.repeat(k, 1, 1), up.repeat(k, 1, 1))
            assert rows[0].shape[0] == k * g
        down_rows, up_rows = rows
        b = x.shape[0]
        if self.conv:  # [B, C, H, W]: the 1x1 convolution as a matrix product over pixels
            h = torch.bmm(down_rows, x.reshape(b, x.shape[1], -1))  # [B, R, HW]
            output.view(b, output.shape[1], -1).baddbmm_(up_rows, h)
        else:
            h = torch.bmm(x.reshape(b, -1, x.shape[-1]), down_rows)  # [B, T, R]
            output.view(b, -1, output.shape[-1]).baddbmm_(h, up_rows)

    def delta(self, x: torch.Tensor, k: int, tiled: bool) -> torch.Tensor:
        """The side paths for rows ``x`` laid out as [k, G, ...] (tiled) or [G, k, ...] (rows in set order)."""
        g = self.down.shape[0]
        lead = (k, g) if tiled else (g, k)
        down, up = (self.down, self.up) if tiled else (self.down[:, None], self.up[:, None])
        if self.conv:  # [B, C, H, W] -> [*lead, C, HW]: the 1x1 convolution as a matrix product over pixels
            b, c, h, w = x.shape
            y = up @ (down @ x.reshape(*lead, c, h * w))
            return y.reshape(b, -1, h, w)
        y = (x.reshape(*lead, -1, x.shape[-1]) @ down.transpose(-1, -2)) @ up.transpose(-1, -2)
        return y.reshape(*x.shape[:-1], -1)


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
