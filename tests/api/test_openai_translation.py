"""OpenAI Images fields onto the native request models (api/openai_images/translation.py) and OpenAI's masks onto
native ones (mask.py): pure functions, no server."""

from __future__ import annotations

import base64
import io
from datetime import datetime, timezone

import pytest
from PIL import Image

from api.errors import ApiError
from api.imageinput import ImageInputError, ImageLimits
from api.openai_images import translation
from api.openai_images.mask import native_mask
from api.openai_images.translation import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
)
from core.jobs import GenerationParams, Img2ImgRequest, InpaintRequest, JobPublic, Status
from tests.images import encode, noise_image, png_b64

LIMITS = ImageLimits(max_bytes=10_000_000, max_pixels=16_000_000)


def generation(**fields: object) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a photo of a cat", **fields})


def refused(call: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.status_code == 422
    return info.value


def test_a_bare_prompt_is_a_native_default_txt2img_at_512() -> None:
    native = translation.txt2img(generation())
    assert native.model_dump() == GenerationParams.model_validate({"prompt": "a photo of a cat"}).model_dump()
    assert (native.width, native.height, native.steps, native.n, native.seed) == (512, 512, 30, 1, None)


def test_fields_map_onto_their_native_counterparts() -> None:
    native = translation.txt2img(generation(
        size="768x512", n=3, quality="low", output_format="webp", output_compression=0, seed=42,
    ))
    assert (native.width, native.height) == (768, 512)
    assert (native.n, native.steps, native.output_format, native.output_quality, native.seed) == (3, 15, "webp", 1, 42)


@pytest.mark.parametrize(("quality", "steps"), sorted(translation.QUALITY_STEPS.items()))
def test_each_quality_is_its_documented_step_count(quality: str, steps: int) -> None:
    assert translation.txt2img(generation(quality=quality)).steps == steps


def test_unknown_fields_and_openai_model_names_are_accepted_and_change_nothing() -> None:
    plain = translation.txt2img(generation())
    extra = translation.txt2img(generation(
        model="gpt-image-2.5-flare", style="vivid", user="u-1", moderation="low", partial_images=0,
        svg={"model": "x"}, background="opaque", stream=False, future_field=[1, 2],
    ))
    assert extra == plain
    for name in ("dall-e-2", "dall-e-3", "gpt-image-1"):  # the deployment's default model
        assert translation.txt2img(generation(model=name)).model is None


def test_any_other_model_name_is_a_served_model_and_a_bad_one_names_model() -> None:
    assert translation.txt2img(generation(model="v1-5-pruned-emaonly")).model == "v1-5-pruned-emaonly"
    error = refused(translation.txt2img, generation(model="no such/model"))
    assert error.info.field == "model"


@pytest.mark.parametrize(("size", "message"), [
    ("1001x512", "size '1001x512': width must be a multiple of 8, got 1001"),
    ("512x4096", "size '512x4096': height: Input should be less than or equal to 2048, got 4096"),
    ("512", "size must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto', got '512'"),
    ("big", "size must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto', got 'big'"),
])
def test_a_bad_size_names_size_and_the_native_rule(size: str, message: str) -> None:
    error = refused(translation.txt2img, generation(size=size))
    assert (error.info.field, error.info.message) == ("size", message)


def test_native_limits_come_back_under_the_openai_field() -> None:
    error = refused(translation.txt2img, generation(n=10))
    assert error.info.field == "n"
    assert error.info.message == "n: Input should be less than or equal to 8, got 10"
    assert refused(translation.txt2img, generation(prompt=" ")).info.field == "prompt"


def test_what_cannot_be_honoured_is_refused_not_ignored() -> None:
    assert refused(translation.txt2img, generation(background="transparent")).info.field == "background"
    assert refused(translation.txt2img, generation(stream=True)).info.field == "stream"


def test_an_edit_takes_one_image_sent_as_image_or_image_array() -> None:
    assert translation.edit_image(ImageEditRequest.model_validate({"prompt": "p", "image": "AAA"})) == "AAA"
    assert translation.edit_image(ImageEditRequest.model_validate({"prompt": "p", "image[]": ["BBB"]})) == "BBB"
    for fields in ({}, {"image[]": ["A", "B"]}, {"image": "A", "image[]": ["B"]}):
        error = refused(translation.edit_image, ImageEditRequest.model_validate({"prompt": "p", **fields}))
        assert error.info.field == "image"


def test_edits_keep_the_image_size_unless_size_is_given() -> None:
    edit = ImageEditRequest.model_validate({"prompt": "p", "image": "AAA"})
    native = translation.img2img(edit, "AAA")
    assert (native.width, native.height, native.strength, native.image) == (None, None, 0.75, "AAA")
    sized = translation.inpaint(edit.model_copy(update={"size": "64x128"}), "AAA", "MMM")
    assert isinstance(sized, InpaintRequest)
    assert (sized.width, sized.height, sized.mask, sized.strength) == (64, 128, "MMM", 1.0)


def test_a_variation_is_img2img_with_the_empty_prompt() -> None:
    native = translation.variation(ImageVariationRequest.model_validate({"image": "AAA", "n": 2, "seed": 5}))
    assert type(native) is Img2ImgRequest
    assert (native.prompt, native.image, native.n, native.seed) == ("", "AAA", 2, 5)


def test_the_answer_carries_each_image_once_as_asked() -> None:
    job = JobPublic.model_validate({
        "id": "j1", "status": Status.succeeded, "task": "txt2img",
        "created_at": datetime(2026, 1, 2, tzinfo=timezone.utc),
        "params": {"prompt": "a cat", "width": 64, "height": 128, "output_format": "jpeg"}, "seeds": [1, 2],
        "images": [{"url": f"http://h/v1/images/j1/{i}.jpg", "key": f"j1/{i}.jpg", "seed": 1 + i, "width": 64,
                    "height": 128, "content_type": "image/jpeg"} for i in range(2)],
    })
    as_b64 = translation.images_response(job, ["QQ==", "Qg=="]).model_dump(exclude_none=True)
    assert as_b64 == {
        "created": 1767312000, "output_format": "jpeg", "size": "64x128", "background": "opaque",
        "data": [{"b64_json": "QQ==", "revised_prompt": "a cat"}, {"b64_json": "Qg==", "revised_prompt": "a cat"}],
    }
    as_url = translation.images_response(job, None).model_dump(exclude_none=True)
    assert [d["url"] for d in as_url["data"]] == ["http://h/v1/images/j1/0.jpg", "http://h/v1/images/j1/1.jpg"]


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_transparent_mask_pixels_become_white_repaint_pixels() -> None:
    mask = Image.new("RGBA", (64, 64), (10, 20, 30, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 32))  # fully transparent: edit
    mask.paste((0, 0, 0, 1), (0, 48, 64, 64))  # nearly transparent: kept, as OpenAI defines it
    native = decoded(native_mask(png_b64(mask), LIMITS))
    assert native.mode == "L"
    assert native.getbbox() == (16, 16, 48, 32)
    assert set(native.get_flattened_data()) == {0, 255}


@pytest.mark.parametrize(("mask", "says"), [
    (noise_image(64, 64), "no transparency"),
    (Image.new("RGBA", (64, 64), (0, 0, 0, 255)), "no fully transparent pixel"),
])
def test_a_mask_that_marks_nothing_is_refused_naming_mask(mask: Image.Image, says: str) -> None:
    with pytest.raises(ImageInputError) as info:
        native_mask(base64.b64encode(encode(mask)).decode(), LIMITS)
    assert info.value.field == "mask"
    assert says in info.value.message
