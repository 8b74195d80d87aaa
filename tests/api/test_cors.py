"""CORS (`SDQ_CORS_ORIGINS`): preflights of a page on an allowed origin are answered before auth, with the headers
the native API needs; answers expose Retry-After, Location and X-Request-ID; other origins get nothing; off by
default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core import apikeys
from core.settings import SettingsError, load_settings

APP = "https://app.example.com"
KEY = "sdq_cors-test-key"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
}


def app_client(redis_url: str, tmp_path: Path, **settings: object) -> TestClient:
    return TestClient(create_app(load_settings(redis_url=redis_url, data_dir=tmp_path / "data", **settings)))


@pytest.fixture
def cors(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """Auth on, so that a preflight (which carries no key) shows it is answered before auth."""
    with app_client(redis_url, tmp_path, cors_origins=f"{APP}, http://127.0.0.1:5173",
                    api_keys=f"me:{apikeys.digest(KEY)}") as client:
        yield client


def test_a_preflight_from_an_allowed_origin_is_answered_with_the_headers_the_api_needs(cors: TestClient) -> None:
    r = cors.options("/v1/txt2img", headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "prefer", "last-event-id"} <= allowed
    assert "access-control-allow-credentials" not in r.headers  # keys travel in a header, never in cookies
    assert r.headers["x-request-id"]
    events = cors.options("/v1/jobs/abc/events", headers={**PREFLIGHT, "Access-Control-Request-Method": "GET",
                                                           "Access-Control-Request-Headers": "authorization"})
    assert events.status_code == 200 and events.headers["access-control-allow-origin"] == APP


def test_answers_to_an_allowed_origin_expose_location_retry_after_and_the_request_id(cors: TestClient) -> None:
    r = cors.post("/v1/txt2img", json={"prompt": "a cat"}, headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 202, r.text
    assert r.headers["access-control-allow-origin"] == APP
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"location", "retry-after", "x-request-id"} <= exposed
    unauthorized = cors.get("/v1/jobs", headers={"Origin": APP})  # the error answer reaches the page too
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == APP


def test_another_origin_gets_no_cors_headers(cors: TestClient) -> None:
    r = cors.options("/v1/txt2img", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    simple = cors.get("/healthz", headers={"Origin": "https://evil.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_is_off_by_default(redis_url: str, tmp_path: Path) -> None:
    with app_client(redis_url, tmp_path) as client:
        r = client.options("/v1/txt2img", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": APP}).headers


def test_a_star_allows_any_origin(redis_url: str, tmp_path: Path) -> None:
    with app_client(redis_url, tmp_path, cors_origins="*") as client:
        r = client.options("/v1/txt2img", headers={**PREFLIGHT, "Origin": "https://anywhere.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://app.example.com/ui"])
def test_a_value_that_is_no_origin_is_refused_naming_the_variable(origin: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(cors_origins=f"http://127.0.0.1:5173,{origin}")
    assert "SDQ_CORS_ORIGINS:" in str(info.value) and "is not an origin" in str(info.value)
