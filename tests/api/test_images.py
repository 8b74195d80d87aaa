from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.storage import LocalStorage
from tests.api.conftest import LiveServer

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def storage(client: TestClient) -> LocalStorage:
    s = client.app.state.storage  # type: ignore[attr-defined]
    assert isinstance(s, LocalStorage)
    return s


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file next to (outside) the storage directory that no request may read."""
    path = tmp_path / "data" / "secret.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("do not serve")
    return path


def test_stored_image_is_served_with_its_type(client: TestClient, storage: LocalStorage) -> None:
    storage.put("job1/0.png", PNG, "image/png")
    r = client.get("/v1/images/job1/0.png")
    assert r.status_code == 200
    assert r.content == PNG
    assert r.headers["content-type"] == "image/png"
    assert storage.url("job1/0.png") == "http://api.example/v1/images/job1/0.png"


def test_missing_image_is_404(client: TestClient) -> None:
    assert client.get("/v1/images/job1/9.png").status_code == 404


@pytest.mark.parametrize(("name", "content_type"), [("0.png", "image/png"), ("1.jpg", "image/jpeg"),
                                                    ("2.webp", "image/webp")])
def test_head_of_an_image_gives_its_type_and_size_without_the_bytes(
    live_server: LiveServer, name: str, content_type: str
) -> None:
    storage = live_server.app.state.storage
    storage.put(f"job1/{name}", PNG, content_type)  # the bytes do not matter: the type comes from the name
    url = f"{live_server.url}/v1/images/job1/{name}"
    with httpx.Client() as http:
        head, get = http.head(url), http.get(url)
    assert head.status_code == get.status_code == 200
    assert head.headers["content-type"] == get.headers["content-type"] == content_type
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(PNG))
    assert head.content == b""
    assert get.content == PNG


@pytest.mark.parametrize(("key", "status"), [("job1/9.png", 404), ("..%2fsecret.txt", 400)])
def test_head_refuses_what_get_refuses(live_server: LiveServer, secret: Path, key: str, status: int) -> None:
    url = f"{live_server.url}/v1/images/{key}"
    with httpx.Client() as http:
        head, get = http.head(url), http.get(url)
    assert head.status_code == get.status_code == status
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert head.content == b""
    assert get.json()["error"]["type"] == ("not_found" if status == 404 else "bad_request")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/%2e%2e/secret.txt",
        "/v1/images/%2E%2E%2Fsecret.txt",
        "/v1/images/job1/%2e%2e/%2e%2e/secret.txt",
        "/v1/images/..%2fsecret.txt",
        "/v1/images/%2Fetc%2Fpasswd",
        "/v1/images//etc/passwd",
        "/v1/images/..%5csecret.txt",
        "/v1/images/job1%5c..%5c..%5csecret.txt",
        "/v1/images/job1/%00.png",
    ],
)
def test_encoded_traversal_is_refused(client: TestClient, secret: Path, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 400, r.text
    assert "do not serve" not in r.text


async def _raw_get(app: FastAPI, path: str) -> tuple[int, bytes]:
    """A request whose path reaches the app exactly as written (HTTP clients would collapse '..' first)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1234), "server": ("testserver", 80),
    }
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")  # type: ignore[misc]
    return int(sent[0]["status"]), body  # type: ignore[call-overload]


@pytest.mark.parametrize("path", ["/v1/images/../secret.txt", "/v1/images/job1/../../secret.txt",
                                  "/v1/images/..\\secret.txt"])
def test_literal_dot_dot_is_refused(client: TestClient, secret: Path, path: str) -> None:
    status, body = asyncio.run(_raw_get(client.app, path))  # type: ignore[arg-type]
    assert status == 400
    assert b"do not serve" not in body


def test_symlink_out_of_the_storage_directory_is_refused(
    client: TestClient, storage: LocalStorage, secret: Path
) -> None:
    (storage.root / "job1").mkdir(parents=True)
    (storage.root / "job1" / "0.png").symlink_to(secret)
    r = client.get("/v1/images/job1/0.png")
    assert r.status_code == 400
    assert "do not serve" not in r.text
