"""The OpenAPI spec documents what the API does: one error shape, every status a route answers, request examples."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

ERROR_REF = "#/components/schemas/ErrorResponse"


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_every_error_answer_is_documented_with_the_one_error_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for method, path, op in operations(spec):
        for code, response in op["responses"].items():
            if code[0] in "45" and path != "/readyz":
                assert list(response["content"]) == ["application/json"], (method, path, code)
                assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path, code)


def test_routes_document_auth_and_the_statuses_they_answer(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for method, path, op in operations(spec):
        protected = path.startswith("/v1/")
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
