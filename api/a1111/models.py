"""AUTOMATIC1111's wire format: the `/sdapi/v1` request and response models, with A1111's field names and defaults.

The request models list every field A1111's `StableDiffusionTxt2ImgProcessingAPI` and `...Img2ImgProcessingAPI`
take, with A1111's defaults (steps 50, CFG scale 7, sampler "Euler"), because A1111 clients send all of them. As in
A1111, every field may be null (= its default) and fields A1111 does not know are ignored. What each field becomes
in a native request, or why it is refused, is `api.a1111.translate`'s business; these models only parse.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class A1111Model(BaseModel):
    # extra="ignore": A1111 ignores fields it does not know (clients of forks send a few more).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A1111's fields are all Optional, and null means the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class GenerationFields(A1111Model):
    """The fields txt2img and img2img share (A1111's `StableDiffusionProcessing`)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, description="-1 = random; image i uses seed + i.")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str | None = Field(None, description="'Euler a', 'Euler', 'DDIM', 'DPM++ 2M' (or 'DPM++ 2M Karras').")
    sampler_index: str = Field("Euler", description="Older name of sampler_name; used when sampler_name is not set.")
    scheduler: str | None = Field(None, description="'Automatic' (the sampler's own), 'Uniform' or 'Karras'.")
    batch_size: int = Field(1, ge=1, description="Images per batch; batch_size x n_iter images in all.")
    n_iter: int = Field(1, ge=1, description="Batches.")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = Field(True, description="false: the answer's images list is empty.")
    save_images: bool = Field(False, description="Accepted either way: sdqueue always stores the images.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgFields(GenerationFields):
    """POST /sdapi/v1/txt2img."""

    enable_hr: bool = False
    denoising_strength: float | None = 0.75  # hires fix only
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class Img2ImgFields(GenerationFields):
    """POST /sdapi/v1/img2img; a `mask` makes it an inpaint."""

    init_images: list[str] | None = Field(None, description="One image: raw base64 or a data: URL.")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize.")
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="White = repaint, black = keep; raw base64 or a data: URL.")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="0 fill, 1 original: both start from the original pixels here.")
    inpaint_full_res: bool = Field(True, description="Accepted either way: sdqueue inpaints the whole picture.")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="The images as raw base64 PNG (no data: prefix).")
    parameters: dict[str, Any] = Field(description="The request's fields, defaults filled in.")
    info: str = Field(description="JSON text: seed, all_seeds, prompt, infotexts (each image's PNG parameters), ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = Field(default=0, description="The caller's jobs that are queued or running.")
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(description="0 to 1, of the caller's running job.")
    eta_relative: float = Field(description="Seconds until it ends (estimated).")
    state: ProgressState
    current_image: str | None = Field(default=None, description="The latest preview, base64, while the job runs.")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class UpscalerItem(A1111Model):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(A1111Model):
    title: str = Field(description="'name [hash]', as A1111 shows it; what sd_model_checkpoint takes.")
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, Any] = Field(default_factory=dict)
    skipped: dict[str, Any] = Field(default_factory=dict)


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class PNGInfoRequest(A1111Model):
    image: str = Field(description="The image: raw base64 or a data: URL.")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="The A1111 parameters text, '' when the image has none.")
    items: dict[str, Any] = Field(description="Other text the image carries (sdqueue's own record).")
    parameters: dict[str, Any] = Field(description="The parameters text parsed: Prompt, Negative prompt, Steps, ...")
