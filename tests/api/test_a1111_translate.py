"""The A1111 field translation (`api.a1111.translate`) on its own: names, defaults, samplers, refusals."""

from __future__ import annotations

import math
from typing import Any

import pytest
import webuiapi
from PIL import Image

from api.a1111 import translate
from api.a1111.models import Img2ImgFields, Txt2ImgFields
from api.errors import ApiError
from core.catalog import ModelInfo
from core.jobs import Img2ImgRequest, InpaintRequest, Priority, Txt2ImgRequest
from core.rules import Sampler

MODEL = ModelInfo(name="v1-5", hash="6ce0161689", sha256="6ce0161689" + "0" * 54, inpainting_unet=False, workers=[])


def txt2img(**fields: Any) -> Txt2ImgRequest:
    return translate.txt2img_request(Txt2ImgFields.model_validate({"prompt": "a cat", **fields}), Priority.normal,
                                     [MODEL])


def img2img(**fields: Any) -> Img2ImgRequest | InpaintRequest:
    body = {"prompt": "a cat", "init_images": ["aW1hZ2U="], **fields}
    return translate.img2img_request(Img2ImgFields.model_validate(body), Priority.normal, [MODEL])


def refused(call: Any, **fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(**fields)
    assert caught.value.status_code == 422
    return caught.value


def webuiapi_payload(method: str, **kwargs: Any) -> dict[str, Any]:
    """The body the unmodified webuiapi client sends for `method` with its own defaults."""
    client = webuiapi.WebUIApi(baseurl="http://127.0.0.1:9/sdapi/v1")  # port 9: nothing listens
    sent: dict[str, Any] = {}

    def capture(url: str, json: dict[str, Any], use_async: bool) -> None:
        sent.update(json)

    client.post_and_get_api_result = capture  # type: ignore[method-assign]
    getattr(client, method)(**kwargs)
    return sent


def test_webuiapis_txt2img_defaults_are_all_accepted_and_mean_what_they_mean_in_a1111() -> None:
    payload = webuiapi_payload("txt2img", prompt="a cat")
    native = translate.txt2img_request(Txt2ImgFields.model_validate(payload), Priority.normal, None)

    assert native.model_dump(include={"prompt", "negative_prompt", "width", "height", "steps", "guidance_scale",
                                      "sampler", "karras", "eta", "seed", "n", "output_format"}) == {
        "prompt": "a cat", "negative_prompt": "", "width": 512, "height": 512, "steps": 20, "guidance_scale": 7.0,
        "sampler": Sampler.euler_a, "karras": False, "eta": 0.0, "seed": -1, "n": 1, "output_format": "png",
    }  # webuiapi sends eta 1.0: the ancestral eta Euler a runs with


def test_webuiapis_img2img_and_inpaint_defaults_are_accepted() -> None:
    image = Image.new("RGB", (8, 8))
    plain = webuiapi_payload("img2img", images=[image], prompt="a cat")
    masked = webuiapi_payload("img2img", images=[image], mask_image=image, prompt="a cat")

    native = translate.img2img_request(Img2ImgFields.model_validate(plain), Priority.normal, None)
    inpaint = translate.img2img_request(Img2ImgFields.model_validate(masked), Priority.normal, None)

    assert type(native) is Img2ImgRequest and native.image == plain["init_images"][0]  # the data: URL as sent
    assert (native.strength, native.resize_mode, native.width, native.height) == (0.75, "resize", 512, 512)
    assert isinstance(inpaint, InpaintRequest) and inpaint.mask == masked["mask"]
    assert (inpaint.invert_mask, inpaint.mask_blur, inpaint.mask_overlay, inpaint.strength) == (False, 4, True, 0.75)


def test_img2img_takes_webuiapis_default_empty_prompt_and_txt2img_refuses_it() -> None:
    image = Image.new("RGB", (8, 8))
    plain = webuiapi_payload("img2img", images=[image])
    masked = webuiapi_payload("img2img", images=[image], mask_image=image)

    assert plain["prompt"] == ""
    assert translate.img2img_request(Img2ImgFields.model_validate(plain), Priority.normal, None).prompt == ""
    assert translate.img2img_request(Img2ImgFields.model_validate(masked), Priority.normal, None).prompt == ""
    assert refused(txt2img, prompt="").info.field == "prompt"


def test_a1111s_own_defaults_apply_to_what_is_left_out_or_null() -> None:
    native = txt2img(steps=None, cfg_scale=None, sampler_name=None)

    assert (native.steps, native.guidance_scale, native.sampler, native.karras, native.n) == (
        50, 7.0, Sampler.euler, False, 1)  # A1111: 50 steps, CFG 7, sampler_index "Euler"


def test_fields_map_onto_the_native_names() -> None:
    native = txt2img(prompt="p", negative_prompt="blurry", width=256, height=128, steps=12, cfg_scale=3.5, seed=7,
                     batch_size=2, n_iter=3)

    assert native.model_dump(include={"prompt", "negative_prompt", "width", "height", "steps", "guidance_scale",
                                      "seed", "n", "preview_every"}) == {
        "prompt": "p", "negative_prompt": "blurry", "width": 256, "height": 128, "steps": 12, "guidance_scale": 3.5,
        "seed": 7, "n": 6, "preview_every": translate.PREVIEW_EVERY,
    }


@pytest.mark.parametrize(("sampler_name", "scheduler", "expected"), [
    ("Euler a", None, (Sampler.euler_a, False)),
    ("Euler", "Automatic", (Sampler.euler, False)),
    ("Euler", "karras", (Sampler.euler, True)),
    ("DDIM", "automatic", (Sampler.ddim, False)),
    ("DPM++ 2M", "Automatic", (Sampler.dpmpp_2m, True)),  # A1111 1.9+: DPM++ 2M's own schedule is Karras
    ("DPM++ 2M", "Uniform", (Sampler.dpmpp_2m, False)),
    ("DPM++ 2M Karras", None, (Sampler.dpmpp_2m, True)),  # the older name carries its scheduler
    ("k_euler_a", None, (Sampler.euler_a, False)),
])
def test_samplers_and_schedulers_by_a1111_name(sampler_name: str, scheduler: str | None,
                                               expected: tuple[Sampler, bool]) -> None:
    native = txt2img(sampler_name=sampler_name, scheduler=scheduler)

    assert (native.sampler, native.karras) == expected


def test_sampler_index_is_used_when_sampler_name_is_not_set() -> None:
    assert txt2img(sampler_index="DDIM").sampler is Sampler.ddim
    assert txt2img(sampler_index="DDIM", sampler_name="Euler").sampler is Sampler.euler


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"sampler_name": "LMS"}, "sampler_name", "unknown sampler 'LMS'"),
    ({"sampler_index": "Heun"}, "sampler_index", "unknown sampler 'Heun'"),
    ({"scheduler": "Exponential"}, "scheduler", "'Exponential' is not supported"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler", "karras sigmas apply to Euler, Euler a, "
                                                                   "DPM++ 2M, not DDIM"),
])
def test_unknown_samplers_and_schedulers_are_refused_by_their_a1111_field(fields: dict[str, Any], field: str,
                                                                          says: str) -> None:
    error = refused(txt2img, **fields)

    assert error.info.field == field and says in error.info.message, error.info


def test_eta_is_ddims_eta_euler_as_ancestral_noise_and_unused_by_the_others() -> None:
    assert txt2img(sampler_name="DDIM", eta=0.3).eta == 0.3
    assert txt2img(sampler_name="DDIM").eta == 0.0  # A1111's eta_ddim default
    assert txt2img(sampler_name="Euler a", eta=1.0).eta == 0.0  # the ancestral eta Euler a always runs with
    assert txt2img(sampler_name="Euler", eta=0.7).eta == 0.0  # A1111 passes no eta to Euler either
    error = refused(txt2img, sampler_name="Euler a", eta=0.5)
    assert error.info.field == "eta" and "got 0.5" in error.info.message


# One value other than the default for each field of a feature sdqueue lacks.
NON_DEFAULTS: dict[str, dict[str, Any]] = {
    "txt2img": {
        "styles": ["Cinematic"], "subseed_strength": 0.5, "seed_resize_from_h": 256, "seed_resize_from_w": 256,
        "restore_faces": True, "tiling": True, "s_min_uncond": 0.2, "s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 5.0,
        "s_noise": 1.003, "script_name": "x/y/z plot",
        "alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}, "infotext": "a cat\nSteps: 20",
        "enable_hr": True, "firstphase_width": 256, "firstphase_height": 256, "firstpass_image": "aW1hZ2U=",
    },
    "img2img": {
        "inpainting_fill": 2, "inpaint_full_res_padding": 32, "initial_noise_multiplier": 1.2,
        "latent_mask": "aW1hZ2U=",
    },
}


def test_every_unsupported_field_has_a_refused_value_here() -> None:
    common = set(NON_DEFAULTS["txt2img"]) - {"enable_hr", "firstphase_width", "firstphase_height", "firstpass_image"}
    for task, entries in translate.UNSUPPORTED.items():
        expected = set(NON_DEFAULTS[task]) | (common if task == "img2img" else set())
        assert {u.field for u in entries} == expected, task


@pytest.mark.parametrize(("field", "value"), NON_DEFAULTS["txt2img"].items())
def test_a_feature_sdqueue_lacks_is_refused_naming_its_field(field: str, value: Any) -> None:
    error = refused(txt2img, **{field: value})

    assert error.info.field == field
    assert error.info.message.startswith(f"{field}: ") and "is not supported" in error.info.message


@pytest.mark.parametrize(("field", "value"), [*NON_DEFAULTS["img2img"].items(), ("styles", ["Cinematic"])])
def test_img2img_refuses_the_features_it_lacks(field: str, value: Any) -> None:
    assert refused(img2img, **{field: value}).info.field == field


@pytest.mark.parametrize(("field", "value"), [
    ("styles", []), ("subseed_strength", 0), ("seed_resize_from_h", 0), ("seed_resize_from_w", -1),
    ("restore_faces", False), ("tiling", False), ("s_min_uncond", 0.0), ("s_churn", 0), ("s_tmin", 0.0),
    ("s_tmax", 0), ("s_tmax", math.inf), ("s_noise", 1), ("refiner_checkpoint", ""), ("script_name", ""),
    ("alwayson_scripts", {}), ("infotext", ""), ("enable_hr", False), ("firstphase_width", 0),
    # A1111 ignores these unless a feature above is on, and so does sdqueue:
    ("hr_scale", 4.0), ("hr_upscaler", "Latent"), ("hr_second_pass_steps", 10), ("hr_prompt", "x"),
    ("denoising_strength", 0.3), ("subseed", 1234), ("script_args", [1, 2]), ("refiner_switch_at", 0.8),
    # Accepted either way: what sdqueue does is the same (the images are stored; nothing to restore).
    ("save_images", True), ("do_not_save_samples", True), ("do_not_save_grid", True), ("comments", {"a": 1}),
    ("override_settings_restore_afterwards", False), ("disable_extra_networks", True), ("force_task_id", "t1"),
    ("seed_enable_extras", False), ("send_images", False),
])
def test_defaults_and_fields_a1111_would_ignore_are_accepted(field: str, value: Any) -> None:
    assert txt2img(**{field: value}).prompt == "a cat"


@pytest.mark.parametrize(("field", "value"), [
    ("inpainting_fill", 1), ("inpaint_full_res", False), ("inpaint_full_res_padding", 0), ("mask_round", False),
    ("initial_noise_multiplier", 1.0), ("image_cfg_scale", 1.5), ("include_init_images", True),
])
def test_img2img_accepts_the_defaults_and_what_changes_nothing_here(field: str, value: Any) -> None:
    assert img2img(mask="bWFzaw==", **{field: value}).prompt == "a cat"


def test_img2img_fields_map_onto_img2img_and_inpaint() -> None:
    plain = img2img(denoising_strength=0.4, resize_mode=1, width=256, height=192)
    inpaint = img2img(mask="bWFzaw==", inpainting_mask_invert=1, mask_blur=0, denoising_strength=0.9)
    blur_xy = img2img(mask="bWFzaw==", mask_blur_x=7, mask_blur_y=7)

    assert type(plain) is Img2ImgRequest
    assert (plain.image, plain.strength, plain.resize_mode, plain.width, plain.height) == (
        "aW1hZ2U=", 0.4, "crop", 256, 192)
    assert isinstance(inpaint, InpaintRequest)
    assert (inpaint.mask, inpaint.invert_mask, inpaint.mask_blur, inpaint.strength) == ("bWFzaw==", True, 0, 0.9)
    assert isinstance(blur_xy, InpaintRequest) and blur_xy.mask_blur == 7


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"init_images": None}, "init_images", "one image is required"),
    ({"init_images": []}, "init_images", "one image is required"),
    ({"init_images": ["aW1hZ2U=", "aW1hZ2U="]}, "init_images", "one image per request, got 2"),
    ({"resize_mode": 2}, "resize_mode", "got 2"),
    ({"resize_mode": 3}, "resize_mode", "got 3"),
    ({"mask": "bWFzaw==", "inpainting_mask_invert": 2}, "inpainting_mask_invert", "got 2"),
    ({"mask": "bWFzaw==", "mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x", "send mask_blur"),
    ({"denoising_strength": 1.5}, "denoising_strength", "less than or equal to 1, got 1.5"),
])
def test_img2img_refusals_name_the_a1111_field(fields: dict[str, Any], field: str, says: str) -> None:
    error = refused(img2img, **fields)

    assert error.info.field == field and says in error.info.message, error.info


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"cfg_scale": 60}, "cfg_scale", "cfg_scale: Input should be less than or equal to 50, got 60.0"),
    ({"steps": 0}, "steps", "steps: Input should be greater than or equal to 1, got 0"),
    ({"batch_size": 4, "n_iter": 3}, "batch_size",
     "batch_size x n_iter: Input should be less than or equal to 8, got 12"),
    ({"width": 500}, "width", "width must be a multiple of 8, got 500"),
    ({"prompt": "   "}, "prompt", "prompt must contain non-whitespace text (txt2img draws from the prompt alone; "
                               "img2img and inpaint may leave it empty)"),
    ({"seed": -2}, "seed", "seed: Input should be greater than or equal to -1, got -2"),
])
def test_native_validation_messages_come_back_with_the_a1111_field_names(fields: dict[str, Any], field: str,
                                                                        message: str) -> None:
    error = refused(txt2img, **fields)

    assert (error.info.field, error.info.message) == (field, message)


def test_override_settings_may_name_a_held_model_and_options_at_their_value() -> None:
    for name in ("v1-5 [6ce0161689]", "v1-5", "v1-5.safetensors", "6ce0161689", MODEL.sha256):
        assert txt2img(override_settings={"sd_model_checkpoint": name}).model == "v1-5"  # the job's model
        assert img2img(override_settings={"sd_checkpoint_hash": name}).model == "v1-5"
    assert txt2img().model is None  # the deployment's default
    assert txt2img(override_settings={"CLIP_stop_at_last_layers": 1, "samples_format": "png"}).prompt == "a cat"

    other = refused(txt2img, override_settings={"sd_model_checkpoint": "anything-v3 [38c1ebe3]"})
    clip_skip = refused(txt2img, override_settings={"CLIP_stop_at_last_layers": 2})
    unknown = refused(txt2img, override_settings={"img2img_color_correction": True})

    assert other.info.field == "override_settings.sd_model_checkpoint" and "v1-5 [6ce0161689]" in other.info.message
    assert clip_skip.info.field == "override_settings.CLIP_stop_at_last_layers" and "got 2" in clip_skip.info.message
    assert unknown.info.field == "override_settings.img2img_color_correction"


def test_without_override_settings_the_model_chosen_by_post_options_is_the_jobs() -> None:
    fields = Txt2ImgFields.model_validate({"prompt": "a cat"})
    assert translate.txt2img_request(fields, Priority.normal, None, "sd15").model == "sd15"
    fields = Txt2ImgFields.model_validate({"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "v1-5"}})
    assert translate.txt2img_request(fields, Priority.normal, [MODEL], "sd15").model == "v1-5"


def test_a_model_is_refused_when_no_live_worker_holds_any() -> None:
    with pytest.raises(ApiError) as caught:
        translate.check_options({"sd_model_checkpoint": "v1-5"}, [])

    assert caught.value.info.field == "sd_model_checkpoint" and "no live worker" in caught.value.info.message


def test_input_image_errors_are_renamed_to_the_a1111_fields() -> None:
    image = translate.image_error("image", "image is not valid base64 (Incorrect padding)", too_large=False)
    mask = translate.image_error("mask", "mask is 8x8 but image is 16x16: they must be the same size", False)
    big = translate.image_error("image", "image is 20,000,000 bytes, more than the limit", too_large=True)

    assert (image.status_code, image.info.field) == (422, "init_images.0")
    assert image.info.message == "init_images.0 is not valid base64 (Incorrect padding)"
    assert (mask.info.field, mask.info.message) == (
        "mask", "mask is 8x8 but image is 16x16: they must be the same size")
    assert (big.status_code, big.info.type, big.info.field) == (413, "payload_too_large", "init_images.0")


def test_the_refiner_checkpoint_and_switch_become_the_native_refiner() -> None:
    job = txt2img(refiner_checkpoint="sd_xl_refiner_1.0.safetensors [7440042bbd]")
    assert job.refiner is not None and (job.refiner.model, job.refiner.switch_at) == ("sd_xl_refiner_1.0", 0.8)
    job = txt2img(refiner_checkpoint="sd_xl_refiner_1.0", refiner_switch_at=0.6)
    assert job.refiner is not None and (job.refiner.model, job.refiner.switch_at) == ("sd_xl_refiner_1.0", 0.6)
    assert txt2img(refiner_switch_at=0.6).refiner is None  # A1111 ignores the switch without a refiner too
    error = refused(txt2img, refiner_checkpoint="sd_xl_refiner_1.0", refiner_switch_at=1.0)
    assert error.info.field == "refiner_switch_at" and "0.95" in error.info.message
