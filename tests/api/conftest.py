from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from api.main import create_app
from core.queues import Keys
from core.settings import Settings, load_settings


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return load_settings(redis_url=redis_url, data_dir=tmp_path / "data", public_url="http://api.example")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    r = Redis.from_url(redis_url)
    yield r
    r.close()


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.queue_prefix)
