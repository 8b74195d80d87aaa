"""What A1111 clients ask about before they generate: options, models, LoRAs, samplers, schedulers, and the lists
of extras sdqueue does not have (upscalers, VAEs, embeddings, scripts), which answer in A1111's shapes, empty.

Models and LoRAs are the live workers' (`core.catalog`), so they follow the workers that run, as `GET /v1/models`
and `GET /v1/loras` do.
Options are fixed (`api.a1111.translate.FIXED_OPTIONS`): a POST may "set" an option to the value it has, and
`sd_model_checkpoint` to a model a live worker holds; anything else is a 422 naming the option. That choice is
kept in Redis (``selected_model``) for the whole deployment, as A1111 has one loaded checkpoint for all its clients:
A1111 requests that name no model then run on it; native and OpenAI requests keep the deployment's default.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Coroutine
from typing import Any

from anyio import to_thread
from fastapi import APIRouter
from PIL import UnidentifiedImageError
from redis import Redis

from api import errors
from api.a1111 import translate
from api.a1111.models import (
    EmbeddingsResponse,
    PNGInfoRequest,
    PNGInfoResponse,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    UpscalerItem,
)
from api.auth import AuthenticatedRoute
from api.deps import KeysDep, RedisDep, SettingsDep
from api.errors import ApiError
from api.imageinput import ImageInputError, ImageLimits, decode_base64, open_image
from core.catalog import ModelInfo, live_loras, loaded_models
from core.imagefile import read_parameters
from core.queues import Keys
from core.rules import SAMPLERS

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], route_class=AuthenticatedRoute)

_INVALID = errors.responses(422, described={422: "An option sdqueue does not have, or not at its value; the "
                                                 "message names it."})


def _selection_key(keys: Keys) -> str:
    return f"{keys.prefix}:a1111:sd_model_checkpoint"


def selected_model(redis: Redis, keys: Keys) -> str | None:
    """The model `POST /options` chose for A1111 requests that name none (None: the deployment's default)."""
    name = redis.get(_selection_key(keys))
    return name.decode() if isinstance(name, bytes) else name


@router.get("/options")
def a1111_get_options(redis: RedisDep, keys: KeysDep, settings: SettingsDep) -> dict[str, Any]:
    """sdqueue's options under A1111's names; `sd_model_checkpoint`: the model A1111 requests that name none run
    on (the last `POST /options` choice, else the default model, else the first live worker's; null when none)."""
    models = loaded_models(redis, keys).models
    wanted = selected_model(redis, keys) or settings.default_model
    shown = next((m for m in models if m.name == wanted), models[0] if models else None)
    return {
        **translate.FIXED_OPTIONS,
        "sd_model_checkpoint": translate.model_title(shown) if shown else None,
        "sd_checkpoint_hash": shown.sha256 if shown else None,
    }


@router.post("/options", responses=_INVALID)
def a1111_set_options(values: dict[str, Any], redis: RedisDep, keys: KeysDep) -> None:
    """Accepted when every option is at sdqueue's value, and `sd_model_checkpoint` names a model a live worker
    holds: A1111 requests that name no model run on it from then on (no worker switches: each keeps its model);
    422 naming the first option that is not."""
    models = loaded_models(redis, keys).models if any(k in values for k in translate.MODEL_OPTIONS) else []
    translate.check_options(values, models)
    for key in translate.MODEL_OPTIONS:
        if key in values and (found := translate.find_model(models, values[key])):
            redis.set(_selection_key(keys), found.name)


@router.get("/sd-models")
def a1111_sd_models(redis: RedisDep, keys: KeysDep) -> list[SDModelItem]:
    """The models the live workers hold (empty while no worker is up)."""
    return [_model_item(m) for m in loaded_models(redis, keys).models]


@router.post("/refresh-checkpoints")
async def a1111_refresh_checkpoints() -> None:
    """Nothing to refresh: the model list follows the live workers."""


@router.get("/samplers")
async def a1111_samplers() -> list[SamplerItem]:
    return [
        SamplerItem(
            name=traits.a1111_name, aliases=list(translate.SAMPLER_ALIASES[sampler]),
            options={"scheduler": translate.OWN_SCHEDULE[sampler]} if sampler in translate.OWN_SCHEDULE else {},
        )
        for sampler, traits in SAMPLERS.items()
    ]


@router.get("/schedulers")
async def a1111_schedulers() -> list[SchedulerItem]:
    return [
        SchedulerItem(name=s.name, label=s.label, aliases=None, default_rho=7.0 if s.karras else -1.0,
                      need_inner_model=False)
        for s in translate.SCHEDULERS
    ]


@router.get("/upscalers")
async def a1111_upscalers() -> list[UpscalerItem]:
    """Only "None": sdqueue has no upscalers (hires fix is refused)."""
    return [UpscalerItem(name="None")]


@router.get("/latent-upscale-modes")
async def a1111_latent_upscale_modes() -> list[dict[str, str]]:
    return []


@router.get("/sd-vae")
async def a1111_sd_vae() -> list[dict[str, str]]:
    """Empty: each checkpoint uses its own VAE (A1111's "Automatic")."""
    return []


@router.get("/loras")
def a1111_loras(redis: RedisDep, keys: KeysDep) -> list[dict[str, Any]]:
    """The live workers' LoRAs, in A1111's shape (`<lora:name:weight>` in the prompt applies one)."""
    return [{"name": lora.name, "alias": lora.name, "path": f"{lora.name}.safetensors", "metadata": {}}
            for lora in live_loras(redis, keys).loras]


@router.post("/refresh-loras")
async def a1111_refresh_loras() -> None:
    """Nothing to refresh: the LoRA list follows the live workers (each reads its folder when it starts)."""


@router.get("/hypernetworks")
async def a1111_hypernetworks() -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers")
async def a1111_face_restorers() -> list[dict[str, Any]]:
    return []


@router.get("/realesrgan-models")
async def a1111_realesrgan_models() -> list[dict[str, Any]]:
    return []


@router.get("/prompt-styles")
async def a1111_prompt_styles() -> list[dict[str, Any]]:
    return []


@router.get("/embeddings")
async def a1111_embeddings() -> EmbeddingsResponse:
    return EmbeddingsResponse()


@router.get("/scripts")
async def a1111_scripts() -> ScriptsList:
    return ScriptsList()


@router.get("/script-info")
async def a1111_script_info() -> list[dict[str, Any]]:
    return []


@router.get("/extensions")
async def a1111_extensions() -> list[dict[str, Any]]:
    return []


@router.get("/cmd-flags")
async def a1111_cmd_flags() -> dict[str, Any]:
    """The flags an A1111 started as this server would have: the API only, no web UI."""
    return {"api": True, "nowebui": True}


@router.post("/png-info", responses=errors.responses(413, 422, described={422: "The image cannot be read."}))
async def a1111_png_info(request: PNGInfoRequest, settings: SettingsDep) -> PNGInfoResponse:
    """The generation parameters an image carries (PNG `parameters` chunk, or JPEG / WebP EXIF comment)."""
    return await to_thread.run_sync(_png_info, request.image.strip(), ImageLimits.from_settings(settings))


# A1111 routes of features sdqueue lacks: a 404 that says so, rather than "Not Found".
LACKING = {
    "extra-single-image": "upscaling and face restoration (extras)",
    "extra-batch-images": "upscaling and face restoration (extras)",
    "interrogate": "prompts from images (interrogate)",
    "create/embedding": "training", "create/hypernetwork": "training", "train/embedding": "training",
    "train/hypernetwork": "training",
    "unload-checkpoint": "loading and unloading models (each worker holds its model)",
    "reload-checkpoint": "loading and unloading models (each worker holds its model)",
}


def _lacking(feature: str) -> Callable[[], Coroutine[Any, Any, None]]:
    async def route() -> None:
        raise ApiError(404, "not_found", f"{feature} is not supported by sdqueue")

    return route


for _path, _feature in LACKING.items():
    router.add_api_route(f"/{_path}", _lacking(_feature), methods=["POST"], include_in_schema=False)


def _png_info(image: str, limits: ImageLimits) -> PNGInfoResponse:
    try:
        data = decode_base64("image", image, limits)
        open_image("image", data, limits)  # the guards of every input image: format, bytes, pixels
        found = read_parameters(data)
    except ImageInputError as exc:  # the field is called `image` in A1111 too
        if exc.too_large:
            raise ApiError(413, "payload_too_large", exc.message, exc.field) from None
        raise translate.invalid(exc.field, exc.message) from None
    except (UnidentifiedImageError, OSError, binascii.Error, ValueError) as exc:
        raise translate.invalid("image", f"image: not a PNG, JPEG or WebP image ({exc})") from None
    text = found["parameters"] or ""
    parameters: dict[str, Any] = {}
    if text:
        parameters = {"Prompt": found["prompt"], "Negative prompt": found["negative_prompt"], **found["settings"]}
        width, _, height = str(found["settings"].get("Size", "")).partition("x")
        if height:  # as A1111's parser: Size-1 and Size-2
            parameters.update({"Size-1": width, "Size-2": height})
    items = {"sdqueue": found["sdqueue"]} if found["sdqueue"] is not None else {}
    return PNGInfoResponse(info=text, items=items, parameters=parameters)


def _model_item(model: ModelInfo) -> SDModelItem:
    return SDModelItem(title=translate.model_title(model), model_name=model.name, hash=model.hash,
                       sha256=model.sha256, filename=model.name, config=None)
