"""POST /v1/img2img and /v1/inpaint without a worker: what is stored and queued, and what is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageChops
from redis import Redis
from rq import Queue
from rq.job import Job

from api.main import create_app
from core.jobs import JobSpec
from core.queues import Keys
from core.settings import Settings
from tests.images import b64, encode, noise_image, png_b64, png_header, white_box

ROOT = Path(__file__).resolve().parents[2]
BASE = {"prompt": "a photo of a cat", "steps": 4, "sampler": "euler"}


def queued_spec(redis: Redis, job_id: str) -> JobSpec:
    return JobSpec.model_validate(Job.fetch(job_id, connection=redis).kwargs["spec"])


def stored(settings: Settings, key: str | None) -> Image.Image:
    assert key is not None
    image = Image.open(settings.data_dir / "images" / key)
    image.load()
    return image


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a.convert(b.mode), b).getbbox() is None


def nothing_queued_or_stored(redis: Redis, keys: Keys, settings: Settings) -> bool:
    images = settings.data_dir / "images"
    files = [p for p in images.rglob("*") if p.is_file()] if images.exists() else []
    return all(len(Queue(q, connection=redis)) == 0 for q in keys.queues()) and not redis.keys("rq:job:*") and not files


def test_img2img_stores_the_input_and_queues_its_key_with_the_images_size(
    client: TestClient, redis: Redis, settings: Settings
) -> None:
    source = noise_image(75, 67)
    r = client.post("/v1/img2img", json={**BASE, "image": png_b64(source), "strength": 0.5, "seed": 7})

    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["task"], job["strength"], job["params"]["width"], job["params"]["height"]) == ("img2img", 0.5, 72, 64)
    spec = queued_spec(redis, job["id"])
    assert (spec.task, spec.strength, spec.init_image_key, spec.mask_key) == (
        "img2img", 0.5, f"{job['id']}/input.png", None)
    assert same(stored(settings, spec.init_image_key), source.crop((0, 0, 72, 64)))  # rounded down by cropping
    assert spec.batch_key() == "img2img:72x64:euler:0:4:from2"  # steps 3 and 4 of 4 run
    job_hash = redis.hgetall(Job.key_for(job["id"]))
    assert sum(len(v) for v in job_hash.values()) < len(png_b64(source)) / 4  # no pixels in Redis
    assert client.get(f"/v1/jobs/{job['id']}").json()["strength"] == 0.5


def test_inpaint_stores_the_prepared_mask_and_asks_for_the_overlay(
    client: TestClient, redis: Redis, settings: Settings
) -> None:
    source, box = noise_image(64, 64), white_box(64, 64, (8, 8, 40, 32))
    r = client.post("/v1/inpaint", json={**BASE, "image": png_b64(source), "mask": png_b64(box), "mask_blur": 0,
                                         "invert_mask": True})

    assert r.status_code == 202, r.text
    spec = queued_spec(redis, r.json()["id"])
    assert (spec.task, spec.strength, spec.mask_overlay) == ("inpaint", 1.0, True)
    assert same(stored(settings, spec.init_image_key), source)
    assert same(stored(settings, spec.mask_key), Image.eval(box, lambda v: 255 - v))
    assert spec.batch_key() == "inpaint:64x64:euler:0:4:from0"


def test_outpaint_queues_the_grown_canvas_and_its_mask(client: TestClient, redis: Redis, settings: Settings) -> None:
    source = noise_image(64, 64)
    r = client.post("/v1/inpaint", json={**BASE, "image": png_b64(source), "mask_blur": 0,
                                         "outpaint": {"left": 16, "top": 8}})

    assert r.status_code == 202, r.text
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (80, 72)
    spec = queued_spec(redis, r.json()["id"])
    canvas, mask = stored(settings, spec.init_image_key), stored(settings, spec.mask_key)
    assert canvas.size == mask.size == (80, 72)
    assert same(canvas.crop((16, 8, 80, 72)), source)
    assert mask.crop((16, 8, 80, 72)).getbbox() is None and mask.crop((0, 0, 16, 72)).getextrema() == (255, 255)


def test_image_tasks_take_an_empty_prompt_and_txt2img_does_not(client: TestClient, redis: Redis) -> None:
    image, mask = png_b64(noise_image(64, 64)), png_b64(white_box(64, 64, (0, 0, 32, 32)))
    empty = {**BASE, "prompt": ""}
    answers = [client.post("/v1/img2img", json={**empty, "image": image}),
               client.post("/v1/inpaint", json={**empty, "image": image, "mask": mask}),
               client.post("/v1/inpaint", json={**empty, "image": image, "outpaint": {"left": 8}}),
               client.post("/v1/img2img", data={**empty, "steps": "4"},
                           files={"image": ("a.png", encode(noise_image(64, 64)), "image/png")})]
    txt2img = client.post("/v1/txt2img", json={**empty, "width": 64, "height": 64})

    assert [r.status_code for r in answers] == [202] * 4, [r.text for r in answers]
    assert [queued_spec(redis, r.json()["id"]).params.prompt for r in answers] == [""] * 4
    assert txt2img.status_code == 422 and txt2img.json()["error"]["field"] == "prompt"


def test_multipart_upload_queues_the_same_job_as_json(client: TestClient, redis: Redis, settings: Settings) -> None:
    source, box = noise_image(72, 64), white_box(72, 64, (0, 0, 32, 32))
    fields = {**BASE, "seed": 11, "strength": 0.8, "mask_blur": 2, "guidance_scale": 6.5,
              "outpaint": {"right": 8}, "webhook_events_filter": ["start"]}
    as_json = client.post("/v1/inpaint", json={**fields, "image": png_b64(source), "mask": png_b64(box)})
    form = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    as_form = client.post("/v1/inpaint", data=form, files={"image": ("cat.png", encode(source), "image/png"),
                                                            "mask": ("mask.webp", encode(box, "WEBP", lossless=True),
                                                                     "image/webp")})

    assert as_json.status_code == as_form.status_code == 202, as_form.text
    a, b = (queued_spec(redis, r.json()["id"]) for r in (as_json, as_form))
    assert a.params == b.params and (a.strength, a.seed, a.batch_key()) == (b.strength, b.seed, b.batch_key())
    assert b.params.width == 80 and b.params.webhook_events_filter == ["start"]
    for key in ("init_image_key", "mask_key"):
        assert same(stored(settings, getattr(a, key)), stored(settings, getattr(b, key)))


def test_a_base64_text_field_works_in_multipart_too(client: TestClient, redis: Redis) -> None:
    r = client.post("/v1/img2img", data=BASE, files={"image": (None, png_b64(noise_image(64, 64)))})  # no filename
    assert r.status_code == 202, r.text
    assert queued_spec(redis, r.json()["id"]).params.steps == 4


def test_strength_zero_and_a_data_url_are_accepted(client: TestClient, redis: Redis) -> None:
    url = "data:image/jpeg;base64," + b64(encode(noise_image(64, 64), "JPEG"))
    r = client.post("/v1/img2img", json={**BASE, "image": url, "strength": 0})
    assert r.status_code == 202, r.text
    assert queued_spec(redis, r.json()["id"]).batch_key().endswith(":from4")  # no step runs


def test_width_and_height_scale_the_input(client: TestClient, redis: Redis, settings: Settings) -> None:
    r = client.post("/v1/img2img", json={**BASE, "image": png_b64(noise_image(100, 50)), "width": 128,
                                         "height": 64, "resize_mode": "crop"})
    assert r.status_code == 202, r.text
    assert stored(settings, queued_spec(redis, r.json()["id"]).init_image_key).size == (128, 64)


GIF = b64(encode(noise_image(64, 64), "GIF"))
PNG = png_b64(noise_image(64, 64))
BAD: list[tuple[str, str, dict[str, Any], int, str, str]] = [
    ("not an image", "/v1/img2img", {"image": b64(b"just some text")}, 422, "image",
     "image must be a PNG, JPEG or WebP image, got data that is not an image"),
    ("GIF", "/v1/img2img", {"image": GIF}, 422, "image", "image must be a PNG, JPEG or WebP image, got a GIF image"),
    ("GIF mask", "/v1/inpaint", {"image": PNG, "mask": GIF}, 422, "mask", "got a GIF image"),
    ("too many bytes", "/v1/img2img", {"image": png_b64(noise_image(256, 256))}, 413, "image",
     "more than the 50,000-byte limit (SDQ_MAX_IMAGE_BYTES)"),
    ("decompression bomb", "/v1/img2img", {"image": b64(png_header(5000, 5000))}, 422, "image",
     "image is 5000x5000 = 25,000,000 pixels, more than the 16,777,216-pixel limit"),
    ("bomb past Pillow's limit", "/v1/inpaint", {"image": PNG, "mask": b64(png_header(99_999, 99_999))}, 422,
     "mask", "mask declares too many pixels"),
    ("mask size mismatch", "/v1/inpaint", {"image": PNG, "mask": png_b64(white_box(64, 48, (0, 0, 8, 8)))}, 422,
     "mask", "mask is 64x48 but image is 64x64: they must be the same size"),
    ("invalid base64", "/v1/img2img", {"image": "iVBORw0KGgo=%%%"}, 422, "image", "image is not valid base64"),
    ("invalid base64 mask", "/v1/inpaint", {"image": PNG, "mask": "####"}, 422, "mask", "mask is not valid base64"),
    ("no mask", "/v1/inpaint", {"image": PNG}, 422, "mask", "mask is required for inpaint unless outpaint is set"),
    ("image too small", "/v1/img2img", {"image": png_b64(noise_image(48, 64))}, 422, "image",
     "image width is 48 px; at least 64 are needed"),
    ("strength above 1", "/v1/img2img", {"image": PNG, "strength": 1.5}, 422, "strength", "less than or equal to 1"),
    ("outpaint that grows nothing", "/v1/inpaint", {"image": PNG, "outpaint": {"overlap": 4}}, 422, "outpaint",
     "outpaint must add pixels on at least one side"),
    ("mask on img2img", "/v1/img2img", {"image": PNG, "mask": PNG}, 422, "mask", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("case", "path", "fields", "code", "field", "rule"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_are_refused_naming_the_field_and_nothing_is_queued_or_stored(
    settings: Settings, redis: Redis, keys: Keys, case: str, path: str, fields: dict[str, Any], code: int,
    field: str, rule: str,
) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_image_bytes": 50_000}))) as client:
        r = client.post(path, json={**BASE, **fields})

    assert r.status_code == code, r.text
    error = r.json()["error"]
    assert error["field"] == field and rule in error["message"], error
    assert len(r.content) < 1000  # the image is not echoed back
    assert nothing_queued_or_stored(redis, keys, settings)


def test_oversized_multipart_file_is_413_before_it_is_encoded(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_image_bytes": 50_000}))) as client:
        r = client.post("/v1/img2img", data=BASE, files={"image": ("big.png", b"\0" * 50_001, "image/png")})

    assert r.status_code == 413
    assert r.json()["error"] == {"type": "payload_too_large", "field": "image",
                                 "message": "image is more than the 50,000-byte limit (SDQ_MAX_IMAGE_BYTES)"}
    assert nothing_queued_or_stored(redis, keys, settings)


def test_strict_size_rule_refuses_sides_that_are_not_multiples_of_8(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    with TestClient(create_app(settings.model_copy(update={"image_size_rule": "strict"}))) as client:
        r = client.post("/v1/img2img", json={**BASE, "image": png_b64(noise_image(64, 70))})
        ok = client.post("/v1/img2img", json={**BASE, "image": png_b64(noise_image(64, 72))})

    assert r.status_code == 422 and r.json()["error"]["field"] == "image"
    assert "image height is 70 px, not a multiple of 8 (SDQ_IMAGE_SIZE_RULE=strict)" in r.json()["error"]["message"]
    assert ok.status_code == 202


def test_a_refused_submission_deletes_the_stored_inputs(settings: Settings, redis: Redis, keys: Keys) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_queued_jobs": 1}))) as client:
        assert client.post("/v1/img2img", json={**BASE, "image": PNG}).status_code == 202
        r = client.post("/v1/inpaint", json={**BASE, "image": PNG, "outpaint": {"left": 8}})

    assert r.status_code == 503 and r.json()["error"]["type"] == "queue_full"
    files = sorted(p.name for p in (settings.data_dir / "images").rglob("*") if p.is_file())
    assert files == ["input.png"]  # the first job's only


def test_openapi_offers_json_and_multipart_with_one_schema(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, model, files in (("/v1/img2img", "Img2ImgRequest", ["image"]),
                               ("/v1/inpaint", "InpaintRequest", ["image", "mask"])):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        ref = f"#/components/schemas/{model}"
        assert content["application/json"]["schema"]["$ref"] == ref
        assert content["multipart/form-data"]["schema"]["$ref"] == ref
        assert [f for f in files if content["multipart/form-data"]["encoding"][f]["contentType"].startswith("image/")]
        assert model in spec["components"]["schemas"]
        assert {"413", "422", "503"} <= set(spec["paths"][path]["post"]["responses"])
    assert spec["components"]["schemas"]["InpaintRequest"]["properties"]["strength"]["default"] == 1.0


def test_image_routes_load_no_numpy_or_torch(redis_url: str, tmp_path: Path) -> None:
    """The API image ships without torch or numpy: decoding, outpaint and blur must need neither."""
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from api.main import create_app\n"
        "from core.settings import load_settings\n"
        "from tests.images import noise_image, png_b64, white_box\n"
        f"app = create_app(load_settings(redis_url={redis_url!r}, data_dir={str(tmp_path)!r}))\n"
        "image, mask = png_b64(noise_image(70, 64)), png_b64(white_box(70, 64, (0, 0, 9, 9)))\n"
        "with TestClient(app) as c:\n"
        "    assert c.post('/v1/img2img', json={'prompt': 'a', 'image': image, 'width': 128,"
        " 'height': 64}).status_code == 202\n"
        "    assert c.post('/v1/inpaint', json={'prompt': 'a', 'image': image, 'mask': mask, 'mask_blur': 3,"
        " 'outpaint': {'left': 9, 'overlap': 2}}).status_code == 202\n"
        "    assert c.post('/v1/inpaint', data={'prompt': 'a'}, files={'image': ('a.png', b'x')}).status_code == 422\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'worker', 'numpy'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_palette_png_with_transparency_arrives_as_rgb_on_white(
    client: TestClient, redis: Redis, settings: Settings
) -> None:
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 10, 120, 200] + [0] * 762)
    palette.putpixel((0, 0), 0)  # index 0 is transparent
    r = client.post("/v1/img2img", json={**BASE, "image": b64(encode(palette, transparency=0))})

    assert r.status_code == 202, r.text
    image = stored(settings, queued_spec(redis, r.json()["id"]).init_image_key)
    assert image.mode == "RGB"
    assert (image.getpixel((0, 0)), image.getpixel((1, 1))) == ((255, 255, 255), (10, 120, 200))


def test_the_documented_examples_are_accepted(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/img2img", "/v1/inpaint"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        for name, example in examples.items():
            r = client.post(path, json=example["value"])
            assert r.status_code == 202, (path, name, r.text)
