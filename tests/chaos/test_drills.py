"""The chaos drills that the current code passes, shortened (`drills.SHORT`: 64x64 jobs of a few steps, a few jobs
and two faults per drill), on one cluster of real processes healed before each drill. Each drill asserts the whole
end state (`tests/chaos/ledger.py`) and logs its figure line.

The other drills fail today because a crash window is still open; they are named, with the failure seen, in
`bench/chaos.py`'s `OPEN_WINDOWS` and run there (`make chaos`) until it is closed. Then they move here.
"""

from __future__ import annotations

import logging

import pytest

from bench.chaos import OPEN_WINDOWS
from tests.chaos import drills
from tests.chaos.cluster import Cluster

log = logging.getLogger(__name__)

PASSING = ("worker_sigkill", "redis_restart", "redis_full", "api_sigkill", "queue_burst", "poison_job",
           "webhook_after_crash")


@pytest.mark.parametrize("name", PASSING)
def test_drill(cluster: Cluster, name: str) -> None:
    figure = drills.DRILLS[name](cluster, drills.SHORT)
    log.info("%s", figure.line())


def test_every_drill_runs_here_or_is_named_as_an_open_window() -> None:
    assert set(PASSING) | set(OPEN_WINDOWS) == set(drills.DRILLS)
    assert not set(PASSING) & set(OPEN_WINDOWS)
