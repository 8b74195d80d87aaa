"""LoRA names on the API side: the request field, A1111's ``<lora:name:weight>`` prompt tags, the names the live
workers can load, and the LoRA files of a directory. No torch here.

Where names come from: each worker lists the ``.safetensors`` files of its ``SDQ_LORA_DIR`` when it starts and
announces their stems with its model (``core.catalog.LoadedModel.loras``, in its own RQ worker hash). The API
accepts a name that some live worker announces (``core.catalog.live_loras``, then ``unknown_loras``), and
``GET /v1/loras`` lists them. So the API needs no access to the LoRA files (its image has no models), and the list
follows the workers that run, as ``GET /v1/models`` does. Workers that share a queue should share one LoRA
directory: any of them may run any job. A file added later is announced when the worker restarts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.rules import MAX_LORA_SCALE

LORA_SUFFIX = ".safetensors"
# A file stem: no path separators, no NUL, no leading dot, nothing that ends a <lora:...> tag.
NAME_PATTERN = r"^[^/\\\x00<>:.][^/\\\x00<>:]{0,127}$"
# A1111's extra-network tags (modules/extra_networks.py): every <word:...> is taken out of the prompt.
_TAG = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")  # A1111 1.5+ runs LyCORIS tags as LoRAs


class LoraRequest(BaseModel):
    """One LoRA of a request, by the file stem the workers announce (`GET /v1/loras`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, examples=["add-detail"], description="A name from `GET /v1/loras`.")
    scale: float = Field(
        1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False,
        description="Multiplier of the LoRA's effect (A1111's weight); negative values push away from it.",
    )


class LoraInfo(BaseModel):
    name: str = Field(description="The value of `loras[].name` (and of `<lora:NAME:weight>` in a prompt).")
    workers: list[str] = Field(description="Live workers that can load it.")


class LoraList(BaseModel):
    loras: list[LoraInfo]


def prompt_loras(prompt: str) -> tuple[str, list[LoraRequest]]:
    """The prompt without its extra-network tags, and the LoRAs its ``<lora:name>`` / ``<lora:name:weight>`` tags
    ask for, as A1111 reads them (the tags are removed, the text around them is kept as it is).

    ValueError for a tag sdqueue cannot run: another kind of extra network, separate text encoder and UNet
    weights, or a weight that is not a number.
    """
    found: list[LoraRequest] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match[1], match[2].split(":")
        if kind not in _LORA_KINDS:
            raise ValueError(f"<{kind}:...> in the prompt: only <lora:name:weight> extra networks are supported")
        name, weights = args[0].strip(), [w.strip() for w in args[1:]]
        if any("=" in w for w in weights) or len(set(weights)) > 1:
            raise ValueError(f"<lora:{match[2]}>: separate text encoder and UNet weights are not supported; "
                             "write one weight, <lora:name:0.8>")
        try:
            scale = float(weights[0]) if weights else 1.0
        except ValueError:
            raise ValueError(f"<lora:{match[2]}>: the weight must be a number, got {weights[0]!r}") from None
        found.append(LoraRequest(name=name, scale=scale))
        return ""

    return _TAG.sub(take, prompt), found


def merged(loras: Sequence[LoraRequest], prompt: str) -> tuple[str, list[LoraRequest]]:
    """``loras`` plus the prompt's tags, and the prompt without them; ValueError naming a LoRA listed twice."""
    text, tagged = prompt_loras(prompt)
    out = [*loras, *tagged]
    seen: set[str] = set()
    for lora in out:
        if lora.name in seen:
            raise ValueError(f"lora {lora.name!r} is asked for twice (in loras or as <lora:...> in the prompt)")
        seen.add(lora.name)
    return text, out


def directory_names(directory: Path | None) -> list[str]:
    """The LoRA names a directory holds: the stems of its ``.safetensors`` files, sorted."""
    if directory is None or not directory.is_dir():
        return []
    return sorted(p.name.removesuffix(LORA_SUFFIX) for p in directory.iterdir()
                  if p.name.endswith(LORA_SUFFIX) and p.is_file() and re.match(NAME_PATTERN, p.stem))


def available(workers: dict[str, list[str]]) -> LoraList:
    """``GET /v1/loras`` from each live worker's announced names."""
    by_name: dict[str, list[str]] = {}
    for worker, names in sorted(workers.items()):
        for name in names:
            by_name.setdefault(name, []).append(worker)
    return LoraList(loras=[LoraInfo(name=n, workers=w) for n, w in sorted(by_name.items())])


def unknown_loras(asked: Sequence[LoraRequest], announced: LoraList) -> str | None:
    """The 422 message for the first asked name no live worker announces, else None."""
    names = {info.name for info in announced.loras}
    for lora in asked:
        if lora.name not in names:
            have = ", ".join(sorted(names)) or "none (no live worker announces any LoRA: set SDQ_LORA_DIR)"
            return f"lora {lora.name!r} is not available; the live workers have: {have}"
    return None

