"""One network of a checkpoint while it loads: its module on the meta device and where each tensor comes from
(``NetworkPart``), the strict check of all of a checkpoint's parts against their networks, and the reading of
each part's tensors into its module. Shared by the model loader (``model.weights``) and the SDXL refiner's
(``model.refiner``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import diffusers_format
from model.single_file import CheckpointError
from model.tensor_reader import Source, TensorReader, source_name


@dataclass
class NetworkPart:
    """One network: its module (on the meta device) and where each of its tensors comes from."""

    label: str
    module: nn.Module
    reader: TensorReader
    sources: Mapping[str, Source]  # module key -> checkpoint key (or a slice of that tensor)
    unexpected: list[str]  # checkpoint keys of this network that no module key takes
    checkpoint_name: Callable[[str], str]  # module key -> the name the checkpoint should have used


def _fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # a 1x1 conv and a linear layer hold the same matrix; VAE attention is stored either way
    return have == want or have == (*want, 1, 1) or (*have, 1, 1) == want


def check_parts(parts: list[NetworkPart], stray: list[str], source: Path) -> None:
    missing: list[str] = []
    unexpected = list(stray)
    wrong: list[str] = []
    for part in parts:
        expected = {k: tuple(v.shape) for k, v in part.module.state_dict().items()}
        missing += [part.checkpoint_name(k) for k in expected if k not in part.sources]
        unexpected += part.unexpected + [source_name(src) for k, src in part.sources.items() if k not in expected]
        for key, src in part.sources.items():
            have = part.reader.shape(src)
            if key in expected and not _fits(have, expected[key]):
                wrong.append(f"{source_name(src)}: checkpoint {list(have)}, network {list(expected[key])}")
    missing = list(dict.fromkeys(missing))  # q, k and v of a fused OpenCLIP projection share one name
    if missing or unexpected or wrong:
        sections = [_listing(title, items) for title, items in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise CheckpointError(
            f"{source} does not match the SD 1.x networks inferred from it:\n" + "\n".join(sections)
        )


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:limit]) + more


def materialize(part: NetworkPart, device: torch.device, dtype: torch.dtype) -> None:
    expected = part.module.state_dict()
    state = {}
    for key, src in part.sources.items():
        tensor = part.reader.get(src, dtype).reshape(expected[key].shape)
        state[key] = tensor.to(device)
    part.module.load_state_dict(state, strict=True, assign=True)
    # non-persistent buffers are not in checkpoints and are still on the meta device: rebuild them
    for name, buffer in list(part.module.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            if leaf != "position_ids":
                raise RuntimeError(f"{part.label}: buffer {name} has no value after loading")
            ids = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
            part.module.get_submodule(owner).register_buffer(leaf, ids, persistent=False)
    part.module.eval().requires_grad_(False)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent.parent}: not a diffusers model folder, {path} is missing")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def folder_part(
    label: str, module: nn.Module, folder: Path, to_module: Callable[[str], str | None],
    from_module: Callable[[str], str], stack: ExitStack, allow_pickle: bool,
) -> NetworkPart:
    # transformers names its files model.safetensors / pytorch_model.bin, diffusers diffusion_pytorch_model.*
    stem, pickle_stem = (("model", "pytorch_model") if label.startswith("text_encoder")
                         else ("diffusion_pytorch_model",) * 2)
    reader = TensorReader()
    for file in diffusers_format.weight_files(folder / label, stem, pickle_stem, allow_pickle):
        reader.add(file, stack, allow_pickle)
    sources, unexpected = {}, []
    for name in reader.shapes:
        key = to_module(name)
        if key is None:
            unexpected.append(f"{label}/{name}")
        else:
            sources[key] = name
    return NetworkPart(label, module, reader, sources, unexpected, lambda k: f"{label}/{from_module(k)}")
