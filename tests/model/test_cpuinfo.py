"""/proc/cpuinfo as the CPU choices read it: the first processor's fields and its flags."""

from __future__ import annotations

import os

import pytest
import torch

from model.cpuinfo import cpu_flags, first_processor


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_the_first_processor_names_the_cpu_and_its_flags_match_what_torch_runs() -> None:
    fields = first_processor()
    assert fields.get("processor") == "0" and fields.get("model name")
    flags = cpu_flags()
    assert flags == frozenset(fields["flags"].split())
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen's kernels use here, detected by torch itself
    if os.environ.get("ATEN_CPU_CAPABILITY") is None:
        expected = {"AVX512": "avx512f", "AVX2": "avx2"}.get(capability)
        assert expected is None or expected in flags, (capability, sorted(flags))
