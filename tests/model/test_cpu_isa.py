"""Packed layers under each oneDNN instruction set: the plain layers' numbers, and no weight reorder per call.

oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, when it loads, so each cap runs in its own interpreter: on an AVX-512
CPU, AVX2 caps it (and MKL and ATen) to the kernels an AVX2-only CPU gets (a weight packed for the wrong kernel is
reordered again on every call there, which is what packing for the real input avoids).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.cpu_pack import can_prepack

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN ops")

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import json, sys
import torch
from torch import nn
from model.cpu_choice import LayerPath, PathChooser
from model.cpu_pack import PackedConv2d, PackedLinear, PackedPointwiseConv, PackedUpsample
from model.layers import Upsample

torch.manual_seed(0)
plain = {"conv3x3": nn.Conv2d(64, 48, 3, padding=1), "conv1x1": nn.Conv2d(64, 48, 1),
         "linear": nn.Linear(64, 48), "upsample": Upsample(64)}
inputs = {"conv3x3": torch.randn(2, 64, 12, 10), "conv1x1": torch.randn(2, 64, 12, 10),
          "linear": torch.randn(2, 30, 64), "upsample": torch.randn(2, 64, 6, 5)}
wrap = {"conv3x3": PackedConv2d, "conv1x1": PackedPointwiseConv, "linear": PackedLinear, "upsample": PackedUpsample}
errors = {}
with torch.inference_mode():
    for path in LayerPath:
        chooser = PathChooser("check")
        chooser.decided = dict.fromkeys(plain, path)
        for kind, layer in plain.items():
            ours = wrap[kind](layer, chooser)
            for x in (inputs[kind], inputs[kind][:1]):  # packed for the first input, run on another too
                errors[f"{kind} {path.value}"] = max(errors.get(f"{kind} {path.value}", 0.0),
                                                     (ours(x) - layer(x)).abs().max().item())
    conv = PackedConv2d(nn.Conv2d(96, 96, 3, padding=1))
    x = torch.randn(2, 96, 16, 16)
    conv(x)
    print("CALLS BEGIN", flush=True)
    conv(x)
    conv(x[:1])
    print("CALLS END", flush=True)
print(json.dumps(errors))
"""


def run_check(isa: str | None) -> tuple[dict[str, float], list[str]]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "PYTHONPATH": str(ROOT)}
    for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"):
        env.pop(name, None)
    if isa:  # MKL (plain fp32 linear layers) and ATen's own kernels capped alike
        env.update(ONEDNN_MAX_CPU_ISA=isa, MKL_ENABLE_INSTRUCTIONS=isa, ATEN_CPU_CAPABILITY=isa.lower())
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300).stdout.splitlines()
    calls = out[out.index("CALLS BEGIN") + 1 : out.index("CALLS END")]
    return json.loads(out[-1]), [line for line in calls if line.startswith("onednn_verbose")]


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_packed_layers_match_plain_and_never_reorder_their_weights_per_call(isa: str | None) -> None:
    errors, verbose = run_check(isa)
    assert set(errors) == {f"{k} {p}" for k in ("conv3x3", "conv1x1", "linear", "upsample") for p in
                           ("packed", "plain")}
    assert max(errors.values()) < 1e-4, errors
    convs = [line for line in verbose if ",convolution," in line]
    assert len(convs) == 2, verbose  # ONEDNN_VERBOSE did log this oneDNN's calls
    assert not [line for line in verbose if ",reorder," in line and "96x96x3x3" in line], verbose
    if isa == "AVX2" and "avx2" in cpu_flags():
        assert all(":avx2," in line for line in convs), convs  # the cap took: AVX2 kernels only
