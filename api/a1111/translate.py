"""AUTOMATIC1111 requests onto the native request models: the one place that knows what each A1111 field means here.

- Names: `cfg_scale` -> `guidance_scale`, `batch_size` x `n_iter` -> `n`, `denoising_strength` -> `strength`,
  `init_images[0]` -> `image`, `inpainting_mask_invert` -> `invert_mask`, `resize_mode` 0/1 -> resize/crop.
- Samplers by A1111 name (`core.rules.SAMPLERS`) or alias, with `scheduler` Automatic / Uniform / Karras. As in
  A1111 1.9+, "Automatic" is the sampler's own schedule (Karras for DPM++ 2M), and an older name such as
  "DPM++ 2M Karras" carries its scheduler.
- `eta`: DDIM's eta; Euler a runs with the ancestral eta 1 (A1111's default), and Euler and DPM++ 2M take no eta
  (A1111 ignores it for them too).
- A feature sdqueue lacks is accepted at its default value, which A1111 clients always send, and refused with a
  422 naming the field otherwise (`UNSUPPORTED`). Fields A1111 itself ignores unless another is set (the `hr_*`
  fields without `enable_hr`, `subseed` without `subseed_strength`) are accepted as A1111 accepts them.
- The native models then check every rule, and their messages come back with the A1111 field names
  (`native_error`), as do those of the input images (`image_error`).
- Options (`override_settings`, `POST /options`): sdqueue's options are fixed, so an option may be "set" to the
  value it has, and `sd_model_checkpoint` to a model a live worker holds (`check_options`): the job's `model`
  (`override_settings`), or the model of later A1111 requests that name none (`POST /options`, as A1111 switches).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api import errors
from api.a1111.models import GenerationFields, Img2ImgFields, Txt2ImgFields
from api.errors import ApiError
from core.catalog import ModelInfo
from core.jobs import GenerationParams, Img2ImgRequest, InpaintRequest, Priority, ResizeMode, Txt2ImgRequest
from core.rules import SAMPLERS, Sampler

# Preview every k steps, for `current_image` of /progress (A1111's show_progress_every_n_steps, default 10).
PREVIEW_EVERY = 10


@dataclass(frozen=True)
class Scheduler:
    name: str
    label: str
    karras: bool | None  # None: the sampler's own schedule


SCHEDULERS = (Scheduler("automatic", "Automatic", None), Scheduler("uniform", "Uniform", False),
              Scheduler("karras", "Karras", True))
SAMPLER_ALIASES: dict[Sampler, tuple[str, ...]] = {
    Sampler.ddim: ("ddim",),
    Sampler.euler: ("k_euler",),
    Sampler.euler_a: ("k_euler_a", "k_euler_ancestral"),
    Sampler.dpmpp_2m: ("k_dpmpp_2m",),
    Sampler.lcm: ("k_lcm",),
    Sampler.tcd: ("k_tcd",),
}
OWN_SCHEDULE: dict[Sampler, str] = {Sampler.dpmpp_2m: "karras"}  # A1111 1.9+ `options={"scheduler": "karras"}`
_SAMPLER_NAMES = {name.lower(): s for s in SAMPLERS for name in (SAMPLERS[s].a1111_name, *SAMPLER_ALIASES[s])}

# What GET /options shows and what override_settings and POST /options may "set": sdqueue's fixed behaviour.
FIXED_OPTIONS: dict[str, Any] = {
    "samples_format": "png",
    "enable_pnginfo": True,
    "CLIP_stop_at_last_layers": 1,
    "sd_vae": "Automatic",
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "eta_noise_seed_delta": 0,
    "randn_source": "CPU",  # noise from CPU generators, as sdqueue draws it
    "live_previews_enable": True,
    "show_progress_every_n_steps": PREVIEW_EVERY,
}
MODEL_OPTIONS = ("sd_model_checkpoint", "sd_checkpoint_hash")


def _off(value: Any) -> bool:
    return not value


def _zero(value: Any) -> bool:
    return value is None or value == 0


def _one(value: Any) -> bool:
    return value is None or value == 1


def _not_positive(value: Any) -> bool:
    return value is None or value <= 0


@dataclass(frozen=True)
class Unsupported:
    """A field of a feature sdqueue lacks, accepted only at its default."""

    field: str
    feature: str
    at_default: Callable[[Any], bool]
    default: str  # what to send instead, for the message


_COMMON = (
    Unsupported("styles", "prompt styles", _off, "[]"),
    Unsupported("subseed_strength", "variation seeds", _zero, "0"),
    Unsupported("seed_resize_from_h", "seed resize", _not_positive, "-1"),
    Unsupported("seed_resize_from_w", "seed resize", _not_positive, "-1"),
    Unsupported("restore_faces", "face restoration", _off, "false"),
    Unsupported("tiling", "tiling", _off, "false"),
    Unsupported("s_min_uncond", "negative guidance minimum sigma", _zero, "0"),
    Unsupported("s_churn", "sigma churn", _zero, "0"),
    Unsupported("s_tmin", "sigma tmin", _zero, "0"),
    Unsupported("s_tmax", "sigma tmax", lambda v: _zero(v) or v == math.inf, "0"),
    Unsupported("s_noise", "sigma noise", _one, "1"),
    Unsupported("script_name", "scripts", _off, "null"),
    Unsupported("alwayson_scripts", "extension scripts", _off, "{}"),
    Unsupported("infotext", "parameters as infotext", _off, "null, and the parameters as fields"),
)
_TXT2IMG = (
    Unsupported("enable_hr", "hires fix", _off, "false"),
    Unsupported("firstphase_width", "hires fix", _zero, "0"),
    Unsupported("firstphase_height", "hires fix", _zero, "0"),
    Unsupported("firstpass_image", "hires fix", _off, "null"),
)
_IMG2IMG = (
    Unsupported("inpainting_fill", "latent noise or nothing as masked content", lambda v: v in (0, 1), "0 or 1"),
    Unsupported("inpaint_full_res_padding", "'only masked' inpainting", _zero, "0"),
    Unsupported("initial_noise_multiplier", "an initial noise multiplier", _one, "1"),
    Unsupported("latent_mask", "a separate latent mask", _off, "null"),
)
UNSUPPORTED: dict[str, tuple[Unsupported, ...]] = {"txt2img": _COMMON + _TXT2IMG, "img2img": _COMMON + _IMG2IMG}
_RESIZE_MODES: dict[int, ResizeMode] = {0: "resize", 1: "crop"}

# Native field -> the A1111 field a client sent it as (how native validation messages name it).
A1111_FIELDS = {
    "guidance_scale": "cfg_scale", "sampler": "sampler_name", "karras": "scheduler", "n": "batch_size",
    "strength": "denoising_strength", "image": "init_images.0", "invert_mask": "inpainting_mask_invert",
    "loras": "prompt",  # A1111 clients ask for LoRAs with <lora:name:weight> in the prompt
    "refiner.model": "refiner_checkpoint", "refiner.switch_at": "refiner_switch_at",
}
# Native sampler names in native messages ("karras sigmas apply to euler, ..."), to be shown as A1111 names.
_NATIVE_SAMPLER = re.compile(r"\b(" + "|".join(sorted((s.value for s in Sampler), key=len, reverse=True)) + r")\b")
# How a message names the A1111 field, where that is not the field itself.
_LABELS = {"batch_size": "batch_size x n_iter"}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field=field)


def txt2img_request(
    fields: Txt2ImgFields, priority: Priority, models: Sequence[ModelInfo] | None, selected: str | None = None
) -> Txt2ImgRequest:
    """The native txt2img request for an A1111 one (422 naming the A1111 field otherwise). Its model: the one
    `override_settings` names, else `selected` (the last `POST /options` choice), else the deployment's default."""
    _check_supported(fields, "txt2img", models)
    return _validate(Txt2ImgRequest, _common(fields, priority, _model(fields, models, selected)))


def img2img_request(
    fields: Img2ImgFields, priority: Priority, models: Sequence[ModelInfo] | None, selected: str | None = None
) -> Img2ImgRequest | InpaintRequest:
    """The native img2img request, or inpaint when `mask` is given; its model as for txt2img."""
    _check_supported(fields, "img2img", models)
    if not fields.init_images:
        raise invalid("init_images", "init_images: one image is required (raw base64 or a data: URL)")
    if len(fields.init_images) > 1:
        raise invalid("init_images", f"init_images: one image per request, got {len(fields.init_images)}; send "
                                     "one request per image")
    if fields.resize_mode not in _RESIZE_MODES:
        raise invalid("resize_mode", f"resize_mode: 0 (just resize) or 1 (crop and resize), got "
                                     f"{fields.resize_mode}; resize and fill and latent upscale are not supported")
    native: dict[str, Any] = {
        **_common(fields, priority, _model(fields, models, selected)), "image": fields.init_images[0],
        "strength": fields.denoising_strength, "resize_mode": _RESIZE_MODES[fields.resize_mode],
    }
    if fields.mask is None:
        return _validate(Img2ImgRequest, native)
    if fields.inpainting_mask_invert not in (0, 1):
        raise invalid("inpainting_mask_invert", "inpainting_mask_invert: 0 (repaint white) or 1 (repaint black), "
                                                f"got {fields.inpainting_mask_invert}")
    return _validate(InpaintRequest, {
        **native, "mask": fields.mask, "invert_mask": bool(fields.inpainting_mask_invert),
        "mask_blur": _mask_blur(fields), "mask_overlay": True,  # A1111 pastes the kept pixels back too
    })


def _model(fields: GenerationFields, models: Sequence[ModelInfo] | None, selected: str | None) -> str | None:
    """The native `model`: a checkpoint `override_settings` names (checked held by `_check_supported`), else
    `selected`."""
    for key in MODEL_OPTIONS:
        if key in fields.override_settings and (found := find_model(models or [], fields.override_settings[key])):
            return found.name
    return selected


def _common(fields: GenerationFields, priority: Priority, model: str | None) -> dict[str, Any]:
    sampler, karras = resolve_sampler(fields.sampler_name or fields.sampler_index, fields.scheduler,
                                      "sampler_name" if fields.sampler_name else "sampler_index")
    return {
        "model": model, "prompt": fields.prompt, "negative_prompt": fields.negative_prompt, "width": fields.width,
        "height": fields.height, "steps": fields.steps, "guidance_scale": fields.cfg_scale, "sampler": sampler,
        "karras": karras, "eta": _eta(sampler, fields.eta), "seed": fields.seed,
        "n": fields.batch_size * fields.n_iter, "priority": priority, "preview_every": PREVIEW_EVERY,
        "output_format": "png", "refiner": _refiner(fields),
    }


def _refiner(fields: GenerationFields) -> dict[str, Any] | None:
    """SDXL's refiner by an A1111 checkpoint name ("sd_xl_refiner_1.0.safetensors [7440042bbd]" or the bare name);
    A1111's switch defaults to 0.8 of the schedule."""
    if not fields.refiner_checkpoint:
        return None
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", fields.refiner_checkpoint).removesuffix(".safetensors")
    switch = 0.8 if fields.refiner_switch_at is None else fields.refiner_switch_at
    return {"model": name, "switch_at": switch}


def resolve_sampler(name: str, scheduler: str | None, field: str = "sampler_name") -> tuple[Sampler, bool]:
    """The sampler and Karras flag for A1111's sampler name and scheduler."""
    named_scheduler = None
    for s in SCHEDULERS:  # older names carry the scheduler: "DPM++ 2M Karras"
        for option in (s.label, s.name):
            if name.lower().endswith(" " + option.lower()):
                named_scheduler, name = s, name[: -len(option) - 1]
                break
    sampler = _SAMPLER_NAMES.get(name.lower())
    if sampler is None:
        names = ", ".join(repr(t.a1111_name) for t in SAMPLERS.values())
        raise invalid(field, f"{field}: unknown sampler {name!r}; sdqueue has {names}")
    chosen = named_scheduler or _scheduler(scheduler)
    karras = chosen.karras if chosen.karras is not None else OWN_SCHEDULE.get(sampler) == "karras"
    return sampler, karras


def _scheduler(name: str | None) -> Scheduler:
    for s in SCHEDULERS:
        if name is None or name.lower() in (s.name, s.label.lower()):
            return s
    labels = ", ".join(repr(s.label) for s in SCHEDULERS)
    raise invalid("scheduler", f"scheduler: {name!r} is not supported; sdqueue has {labels}")


def _eta(sampler: Sampler, eta: float | None) -> float:
    if sampler is Sampler.ddim:
        return float(FIXED_OPTIONS["eta_ddim"]) if eta is None else eta
    if sampler is Sampler.euler_a and eta is not None and eta != FIXED_OPTIONS["eta_ancestral"]:
        raise invalid("eta", f"eta: Euler a runs with eta 1 (full ancestral noise) here, got {eta:g}")
    return 0.0


def _mask_blur(fields: Img2ImgFields) -> int:
    if fields.mask_blur is not None:
        return fields.mask_blur
    if fields.mask_blur_x != fields.mask_blur_y:
        raise invalid("mask_blur_x", f"mask_blur_x: a horizontal blur ({fields.mask_blur_x}) other than the "
                                     f"vertical one ({fields.mask_blur_y}) is not supported; send mask_blur")
    return fields.mask_blur_x


def _check_supported(fields: GenerationFields, task: str, models: Sequence[ModelInfo] | None) -> None:
    for u in UNSUPPORTED[task]:
        value = getattr(fields, u.field)
        if not u.at_default(value):
            raise invalid(u.field, f"{u.field}: {u.feature} is not supported by sdqueue, got "
                                   f"{errors.summarize(value)}; send {u.default} or leave it out")
    check_options(fields.override_settings, models, "override_settings")


def check_options(values: Mapping[str, Any], models: Sequence[ModelInfo] | None, field: str | None = None) -> None:
    """422 unless each option is one sdqueue has, at its value (`sd_model_checkpoint`: a live worker's model)."""
    for key, value in values.items():
        path = f"{field}.{key}" if field else key
        if key in MODEL_OPTIONS:
            if find_model(models or [], value) is None:
                held = ", ".join(repr(model_title(m)) for m in models or []) or "none (no live worker)"
                raise invalid(path, f"{path}: no live worker holds model {value!r}; the models held: {held}")
        elif key not in FIXED_OPTIONS:
            raise invalid(path, f"{path}: {key!r} is not an option sdqueue has; it has {', '.join(FIXED_OPTIONS)}")
        elif value != FIXED_OPTIONS[key]:
            raise invalid(path, f"{path}: fixed at {FIXED_OPTIONS[key]!r} in sdqueue, got {errors.summarize(value)}")


def model_title(model: ModelInfo) -> str:
    """A1111's checkpoint title: 'name [short hash]'."""
    return f"{model.name} [{model.hash}]" if model.hash else model.name


def find_model(models: Sequence[ModelInfo], name: Any) -> ModelInfo | None:
    """The model `name` refers to by any name A1111 accepts for a checkpoint (title, name, file, hashes)."""
    for m in models:
        if name in (model_title(m), m.name, f"{m.name}.safetensors", m.hash, m.sha256) and name is not None:
            return m
    return None


def _validate(model: type[GenerationParams], native: dict[str, Any]) -> Any:
    try:
        return model.model_validate(native)
    except ValidationError as exc:
        raise native_error(exc) from None


def native_error(exc: ValidationError) -> ApiError:
    """A native validation error with the A1111 field names: "cfg_scale: Input should be ... <= 50, got 60"."""
    problems = []
    for err in exc.errors():
        loc = list(err["loc"])
        whole = ".".join(str(p) for p in loc)
        if whole in A1111_FIELDS:  # a nested native field that is one A1111 field (refiner.switch_at)
            loc = [A1111_FIELDS[whole]]
        elif loc:
            loc[0] = A1111_FIELDS.get(str(loc[0]), loc[0])
        field = ".".join(str(p) for p in loc)
        _, message = errors.describe({**err, "loc": (_LABELS.get(field, field),)})
        problems.append((field, _NATIVE_SAMPLER.sub(lambda m: SAMPLERS[Sampler(m[0])].a1111_name, message)))
    return invalid(problems[0][0], "; ".join(message for _, message in problems))


def image_error(field: str, message: str, too_large: bool) -> ApiError:
    """An input image's error (`api.imageinput.ImageInputError`), named as the A1111 client sent the image."""
    a1111 = A1111_FIELDS.get(field, field)
    if message.startswith(field + " "):
        message = a1111 + message[len(field):]
    if too_large:
        return ApiError(413, "payload_too_large", message, a1111)
    return invalid(a1111, message)
