"""One cluster of real processes for the drills of a module; each drill starts from a healed cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.weights import save_random_checkpoint, tiny_configs

    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors", *tiny_configs())


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("chaos"), tiny_checkpoint)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(shared_cluster: Cluster) -> Cluster:
    """The module's cluster with Redis, the API, the webhook sender and its workers all up."""
    shared_cluster.heal()
    return shared_cluster
