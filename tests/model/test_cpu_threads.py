"""PyTorch's CPU thread count follows the cgroup CPU quota and the affinity set, not the host's cores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.threads import cgroup_cpu_quota, set_cpu_threads, usable_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == 1  # rounded down: a second thread would be throttled half the time
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == affinity()
    (tmp_path / "cpu.max").write_text("5000 100000\n")
    assert usable_cpus(tmp_path) == 1  # a twentieth of a CPU still gets one thread


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == affinity()
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0 and usable_cpus(tmp_path) == 1
    (v1 / "cpu.cfs_quota_us").write_text(f"{100000 * (affinity() + 8)}\n")
    assert usable_cpus(tmp_path) == affinity()  # a quota above the affinity set adds no CPU


def test_set_cpu_threads_applies_the_quota_unless_omp_num_threads_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_threads: None
) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_cpu_threads(tmp_path) == 1 and torch.get_num_threads() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert set_cpu_threads(tmp_path) == affinity() == torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert set_cpu_threads(tmp_path) == 1  # the user's setting stands
