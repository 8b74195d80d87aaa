"""The OpenAPI spec documents what the API does: one error shape, every status a route answers, request examples."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from api import errors
from api.main import create_app
from api.openai_images import PATHS as OPENAI_PATHS
from core import apikeys
from core.settings import Settings

ERROR_REF = "#/components/schemas/ErrorResponse"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_every_error_answer_is_documented_with_the_one_error_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for method, path, op in operations(spec):
        for code, response in op["responses"].items():
            # The OpenAI Images paths answer OpenAI's error shape (tests/api/test_openai_routes.py).
            if code[0] in "45" and path != "/readyz" and path not in OPENAI_PATHS:
                assert list(response["content"]) == ["application/json"], (method, path, code)
                assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path, code)


def test_routes_document_auth_and_the_statuses_they_answer(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for method, path, op in operations(spec):
        protected = path.startswith(("/v1/", "/sdapi/v1/"))
        assert ("401" in op["responses"]) is protected, (method, path)
        assert ("security" in op) is protected, (method, path)
    submit = spec["paths"]["/v1/txt2img"]["post"]
    assert set(submit["responses"]) >= {"200", "202", "400", "401", "403", "409", "413", "422", "429", "503"}
    assert submit["responses"]["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    assert {p["name"] for p in submit["parameters"]} == {"prefer", "idempotency-key"}
    examples = submit["requestBody"]["content"]["application/json"]["examples"]
    assert examples["small"]["value"]["prompt"] == "a photo of a cat"
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    assert set(spec["paths"]["/v1/jobs/{job_id}/cancel"]["post"]["responses"]) >= {"200", "202", "404", "409"}


# What SDK generators turn into method names: (method, path) -> operationId.
OPERATION_IDS = {
    ("POST", "/v1/txt2img"): "submit_txt2img",
    ("POST", "/v1/img2img"): "submit_img2img",
    ("POST", "/v1/inpaint"): "submit_inpaint",
    ("GET", "/v1/jobs"): "list_jobs",
    ("GET", "/v1/jobs/{job_id}"): "get_job",
    ("POST", "/v1/jobs/{job_id}/cancel"): "cancel_job",
    ("GET", "/v1/jobs/{job_id}/events"): "stream_job_events",
    ("GET", "/v1/images/{key}"): "get_image",
    ("HEAD", "/v1/images/{key}"): "head_image",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/samplers"): "list_samplers",
    ("GET", "/healthz"): "healthz",
    ("GET", "/readyz"): "readyz",
    ("GET", "/metrics"): "get_metrics",
}


def spec_of(settings: Settings) -> dict[str, Any]:
    return create_app(settings).openapi()


def test_operation_ids_are_unique_sdk_method_names(settings: Settings) -> None:
    ops = operations(spec_of(settings))
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", i) for i in ids), ids
    assert {(method, path): op["operationId"] for method, path, op in ops}.items() >= OPERATION_IDS.items()


def test_error_type_is_the_closed_set_the_handlers_answer_with(settings: Settings) -> None:
    spec = spec_of(settings)
    schema = spec["components"]["schemas"]["ErrorInfo"]["properties"]["type"]
    assert schema["type"] == "string"
    assert schema["enum"] == list(errors.ERROR_TYPES)
    # Each type is documented under the status that answers it, with an example message.
    documented = {t for default, _, examples in errors.ERRORS.values() for t in (default, *examples)}
    assert documented == set(errors.ERROR_TYPES)
    for method, path, op in operations(spec):
        for code, response in op["responses"].items():
            for example in response.get("content", {}).get("application/json", {}).get("examples", {}).values():
                assert example["value"]["error"]["type"] in schema["enum"], (method, path, code)


@pytest.mark.parametrize("status", [404, 405, 418, 502])
def test_http_errors_of_any_status_answer_a_type_from_the_set(client: TestClient, status: int) -> None:
    app = client.app
    assert isinstance(app, FastAPI)

    @app.get(f"/raises/{status}")
    def raises() -> None:
        raise HTTPException(status)

    r = client.get(f"/raises/{status}")
    assert r.status_code == status
    assert r.json()["error"]["type"] in errors.ERROR_TYPES


def test_image_downloads_document_their_content_types(settings: Settings) -> None:
    image = spec_of(settings)["paths"]["/v1/images/{key}"]
    content = image["get"]["responses"]["200"]["content"]
    assert set(content) == {"image/png", "image/jpeg", "image/webp"}
    assert all(c["schema"] == {"type": "string", "format": "binary"} for c in content.values())
    assert set(image["head"]["responses"]) >= {"200", "400", "404"}


def test_security_is_declared_exactly_where_a_request_without_a_key_is_refused(settings: Settings) -> None:
    with_auth = settings.model_copy(update={"api_keys": f"alice:{apikeys.digest('sdq_alice-test-key')}"})
    app = create_app(with_auth)
    spec = app.openapi()
    scheme = spec["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    with TestClient(app) as c:
        for method, path, op in operations(spec):
            url = re.sub(r"\{\w+\}", "x", path)
            r = c.request(method, url, json={} if method == "POST" else None)
            if "security" in op:
                assert op["security"] == [{"HTTPBearer": []}], (method, path)
                assert r.status_code == 401, (method, path, r.status_code)
            else:
                assert r.status_code != 401, (method, path)
        # The docs are open too, and are not operations of the spec.
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/assets/swagger-ui.css"):
            assert c.get(path).status_code == 200, path
    assert not {"/openapi.json", "/docs", "/redoc"} & set(spec["paths"])
