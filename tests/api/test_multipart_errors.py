"""A multipart body that is not a whole form gets the documented 400 `bad_request` (README error table, the
routes' OpenAPI 400), over real HTTP; nothing is stored or queued."""

from __future__ import annotations

import httpx
import pytest
from redis import Redis

from core.queues import Keys
from core.settings import Settings
from tests.api.conftest import LiveServer
from tests.api.test_img2img import nothing_queued_or_stored
from tests.images import encode, noise_image

B = "sdq-test-boundary"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    kind = "\r\nContent-Type: image/png" if filename else ""
    return f"--{B}\r\nContent-Disposition: {disposition}{kind}\r\n\r\n".encode() + value + b"\r\n"


WHOLE = part("prompt", b"a cat") + part("steps", b"4") + part("image", encode(noise_image(64, 64)), "a.png") + \
    f"--{B}--\r\n".encode()


@pytest.mark.parametrize(("body", "content_type", "says"), [
    (WHOLE[:-30], f"multipart/form-data; boundary={B}", "closing boundary"),  # cut inside the image
    (WHOLE[: WHOLE.index(b"a cat")], f"multipart/form-data; boundary={B}", "closing boundary"),  # cut in a part
    (WHOLE[: -len(f"--{B}--\r\n")], f"multipart/form-data; boundary={B}", "closing boundary"),  # no final boundary
    (b"", f"multipart/form-data; boundary={B}", "closing boundary"),
    (b"just some text", f"multipart/form-data; boundary={B}", "multipart body"),
    (f"--{B}\r\nContent-Disposition form-data\r\n\r\nx\r\n--{B}--\r\n".encode(), f"multipart/form-data; boundary={B}",
     "multipart body"),
    (f"--{B}\r\nX-Other: y\r\n\r\nx\r\n--{B}--\r\n".encode(), f"multipart/form-data; boundary={B}", '"name"'),
    (WHOLE, "multipart/form-data", "boundary"),
])
def test_a_broken_multipart_body_is_400_bad_request(
    live_server: LiveServer, redis: Redis, keys: Keys, settings: Settings, body: bytes, content_type: str, says: str
) -> None:
    for path in ("/v1/img2img", "/v1/inpaint"):
        r = httpx.post(live_server.url + path, content=body, headers={"content-type": content_type}, timeout=10)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "bad_request" and says in error["message"], error
    assert nothing_queued_or_stored(redis, keys, settings)


def test_the_whole_form_is_queued(live_server: LiveServer, redis: Redis) -> None:
    r = httpx.post(live_server.url + "/v1/img2img", content=WHOLE,
                   headers={"content-type": f"multipart/form-data; boundary={B}"}, timeout=10)
    assert r.status_code == 202, r.text
    assert redis.exists(f"rq:job:{r.json()['id']}")
