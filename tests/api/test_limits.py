"""GET /v1/limits (what the request schema cannot carry) and the open playground page at /."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from api.playground import CONTENT_SECURITY_POLICY
from core import apikeys, rules
from core.settings import Settings

KEY = "sdq_limits-test-key"


def test_limits_are_this_servers_settings_and_need_a_key_when_auth_is_on(settings: Settings) -> None:
    configured = settings.model_copy(update={
        "api_keys": f"alice:{apikeys.digest(KEY)}", "max_image_bytes": 5000, "max_image_pixels": 1_000_000,
        "image_size_rule": "strict",
    })
    with TestClient(create_app(configured)) as client:
        refused = client.get("/v1/limits")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
        limits = client.get("/v1/limits", headers={"Authorization": f"Bearer {KEY}"})
    assert limits.status_code == 200
    assert limits.json() == {"side_multiple": rules.SIDE_MULTIPLE, "max_body_bytes": configured.max_body_bytes,
                             "max_image_bytes": 5000, "max_image_pixels": 1_000_000, "image_size_rule": "strict"}


def test_the_playground_page_and_its_files_are_open_and_self_contained(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"api_keys": f"alice:{apikeys.digest(KEY)}"}))) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        for name in ("app.js", "api.js", "events.js", "form.js", "imageinput.js", "jobs.js", "curl.js", "app.css"):
            asset = client.get(f"/playground/{name}")
            assert asset.status_code == 200, name
            assert "http://" not in asset.text and "https://" not in asset.text, name  # nothing from elsewhere
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not an API operation
