"""The self-check's choices kept on disk: a later process on the same machine takes them without measuring."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from model.cpu_choice import LayerPath, PathChooser
from model.cpu_choice_store import ChoiceStore, Stored, default_path, resolve_path
from model.cpu_pack import ChosenLayer, can_prepack, prepack
from model.weights import load_components

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN ops")

KINDS = {"conv3x3", "conv1x1", "linear", "upsample"}


def layers(module: nn.Module) -> list[ChosenLayer]:
    return [m for m in module.modules() if isinstance(m, ChosenLayer)]


def packed_unet(checkpoint: Path, store: ChoiceStore | None, **chooser: float) -> tuple[nn.Module, PathChooser]:
    unet = copy.deepcopy(load_components(checkpoint).unet)
    choice = PathChooser("UNetModel", store=store, **chooser)  # type: ignore[arg-type]
    prepack(unet, choice)
    return unet, choice


def run_twice(unet: nn.Module) -> torch.Tensor:
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 77, 32), \
        torch.full((2,), 321)
    with torch.inference_mode():
        unet(x, t, ctx)
        return unet(x, t, ctx)


def test_a_second_process_takes_the_stored_choices_without_measuring(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "cache" / "cpu-choices.json"  # the folder does not exist yet
    unet, first = packed_unet(tiny_checkpoint, ChoiceStore(file), budget_s=1e9)
    expected = run_twice(unet)
    assert set(first.decided) == KINDS and any(layer.measured for layer in layers(unet))
    entries = json.loads(file.read_text())["choices"]
    assert len(entries) == len(KINDS)
    conv = next(v for k, v in entries.items() if " UNetModel float32 conv3x3 2x4x8x8" in k)  # conv_in's input
    assert conv["path"] == first.decided["conv3x3"].value and conv["layers"] >= 1

    again, second = packed_unet(tiny_checkpoint, ChoiceStore(file))
    with caplog.at_level(logging.INFO, logger="model.cpu_choice"):
        out = run_twice(again)
    assert second.decided == first.decided and second.totals == {}  # nothing measured
    assert not any(layer.measured for layer in layers(again))
    assert {layer.path for layer in layers(again) if layer.path is not None} <= set(first.decided.values())
    assert f"UNetModel conv3x3 layers: {first.decided['conv3x3'].value} (stored in {file}" in caplog.text
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_a_stored_choice_is_followed_and_other_keys_are_measured(tiny_checkpoint: Path, tmp_path: Path) -> None:
    file = tmp_path / "cpu-choices.json"
    store = ChoiceStore(file)
    for kind, shape in (("conv3x3", (2, 4, 8, 8)), ("conv1x1", (2, 32, 8, 8))):
        store.put(store.key("UNetModel", torch.float32, kind, shape), Stored("plain", 2.0, 1.0, 3))
    unet, choice = packed_unet(tiny_checkpoint, ChoiceStore(file), budget_s=1e9)
    run_twice(unet)
    assert choice.decided["conv3x3"] is LayerPath.PLAIN and choice.decided["conv1x1"] is LayerPath.PLAIN
    assert "conv3x3" not in choice.totals and "conv1x1" not in choice.totals  # followed, not measured
    assert choice.totals["linear"].layers >= 1  # no entry: measured, then stored
    convs = [layer for layer in layers(unet) if layer.kind in ("conv3x3", "conv1x1") and layer.path is not None]
    assert convs and all(layer.path is LayerPath.PLAIN and layer.packed is None for layer in convs)
    keys = json.loads(file.read_text())["choices"]
    assert {k.split()[3] for k in keys} == KINDS  # the other process's entries kept, the new ones added


def test_another_cpu_setting_or_size_is_another_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ChoiceStore(tmp_path / "c.json")
    key = store.key("UNetModel", torch.bfloat16, "linear", (2, 64, 320))
    assert key.endswith(" UNetModel bfloat16 linear 2x64x320")
    assert store.key("UNetModel", torch.bfloat16, "linear", (2, 256, 320)) != key
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert ChoiceStore(tmp_path / "c.json").key("UNetModel", torch.bfloat16, "linear", (2, 64, 320)) != key
    torch_threads = torch.get_num_threads()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    try:
        torch.set_num_threads(torch_threads + 1)
        assert ChoiceStore(tmp_path / "c.json").signature != store.signature
    finally:
        torch.set_num_threads(torch_threads)
    assert ChoiceStore(tmp_path / "c.json").signature == store.signature


def test_a_broken_or_unwritable_file_is_logged_and_the_check_measures(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="model.cpu_choice_store"):
        unet, choice = packed_unet(tiny_checkpoint, ChoiceStore(broken), budget_s=1e9)
        run_twice(unet)
    assert set(choice.decided) == KINDS and all(choice.totals[k].layers for k in KINDS)
    assert f"cannot read {broken}" in caplog.text
    assert len(json.loads(broken.read_text())["choices"]) == len(KINDS)  # rewritten whole
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.cpu_choice_store"):
        unet, choice = packed_unet(tiny_checkpoint, ChoiceStore(blocked / "cpu-choices.json"), budget_s=1e9)
        run_twice(unet)
    assert set(choice.decided) == KINDS
    assert caplog.text.count("CPU self-check store:") == 1  # once per store, not once per kind
    assert str(blocked) in caplog.text


def test_each_kind_measures_at_most_max_layers(tiny_checkpoint: Path) -> None:
    unet, choice = packed_unet(tiny_checkpoint, None, budget_s=1e9, max_layers=2)
    run_twice(unet)
    assert set(choice.decided) == KINDS
    for kind in KINDS:
        measured = [layer for layer in layers(unet) if layer.kind == kind and layer.measured]
        assert 1 <= len(measured) <= 2 and choice.totals[kind].layers == len(measured)
    assert sum(layer.kind == "conv3x3" for layer in layers(unet)) > 2  # so the cap did stop the measuring


def test_the_setting_names_a_file_the_default_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_path() == tmp_path / "sdqueue" / "cpu-choices.json"
    assert resolve_path("") == resolve_path(None) == default_path()
    assert resolve_path("off") is None and resolve_path(" OFF ") is None
    assert resolve_path("/srv/sdq/choices.json") == Path("/srv/sdq/choices.json")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_path("~/c.json") == tmp_path / "home" / "c.json"
