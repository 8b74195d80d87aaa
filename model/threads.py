"""How many CPU threads PyTorch runs: the CPUs this process may really use, not the host's core count.

In a container the host's cores are visible but a CPU quota (cgroup ``cpu.max``, or ``cpu.cfs_quota_us`` under
cgroup v1) may grant only a few of them; more compute threads than that get throttled in turn mid-operation, and
every oneDNN kernel waits for its slowest thread. The count is the smaller of the CPU affinity set and the quota
(rounded down, at least 1). ``OMP_NUM_THREADS``, when set, is left to PyTorch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """CPUs granted by the cgroup quota (2.5 for "250000 100000"), or None when there is none or none readable."""
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1: quota -1 means none
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """The CPUs this process can keep busy: its affinity set, capped by the cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity off Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def set_cpu_threads(root: Path = CGROUP) -> int:
    """Set PyTorch's intra-op threads to ``usable_cpus()`` unless ``OMP_NUM_THREADS`` says otherwise; returns
    the count in force."""
    if os.environ.get("OMP_NUM_THREADS"):
        log.info("CPU threads: %d (OMP_NUM_THREADS)", torch.get_num_threads())
        return torch.get_num_threads()
    threads = usable_cpus(root)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("CPU threads: %d (affinity and cgroup CPU quota)", threads)
    return threads
