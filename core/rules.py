"""The rules of a generation, each defined once: limits, the sampler table, image seeds, the img2img start step, and
which jobs may share a batch.

Plain Python (no pydantic, torch, Redis or settings), so every layer uses these same definitions: the API's request
models (``core.jobs``), the worker, and the pipeline (``model/``), which checks a request again before it runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

MIN_SIDE = 64
MAX_SIDE = 2048
MIN_REFINER_SWITCH, MAX_REFINER_SWITCH = 0.05, 0.95  # the base and the refiner each run some steps
MAX_CONDITIONING_SIDE = 8192  # SDXL's size conditioning: sizes the model is told of, not drawn
SIDE_MULTIPLE = 8  # the VAE maps 8x8 pixels to one latent
MAX_STEPS = 150
MAX_IMAGES = 8  # images of one request
MAX_SEED = 2**32 - 1  # seeds of a request; image i uses seed + i, which may pass it
MAX_GUIDANCE = 50.0
LCM_ORIGINAL_STEPS = 50  # the schedule LCM models were distilled on (diffusers' original_inference_steps)
GUIDANCE_OFF = 1.0  # a guidance scale at or below this runs without classifier-free guidance (one UNet pass)
MAX_LORAS = 8  # LoRAs of one request
MAX_LORA_SCALE = 10.0  # |scale| of a LoRA (A1111 accepts negative weights: they push away from the LoRA)
# 75-token chunks of a prompt (A1111 sets no limit): every row of a batch attends over the longest prompt's
# chunks, so one very long prompt costs its batch mates time. Chunks past the limit are dropped with a warning.
MAX_PROMPT_CHUNKS = 8
# A model's name, as its workers announce it (a checkpoint's stem, or SDQ_MODEL_NAME): part of its queues' names.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class Sampler(str, Enum):
    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"
    lcm = "lcm"
    tcd = "tcd"


@dataclass(frozen=True)
class SamplerTraits:
    a1111_name: str  # the name AUTOMATIC1111 shows and writes into image metadata
    karras: bool  # accepts Karras sigma spacing
    eta: bool  # accepts a non-zero eta (stochastic DDIM; TCD's gamma)
    max_steps: int = MAX_STEPS  # LCM picks its steps from a fixed 50-step distillation schedule


SAMPLERS: dict[Sampler, SamplerTraits] = {
    Sampler.ddim: SamplerTraits("DDIM", karras=False, eta=True),
    Sampler.euler: SamplerTraits("Euler", karras=True, eta=False),
    Sampler.euler_a: SamplerTraits("Euler a", karras=True, eta=False),
    Sampler.dpmpp_2m: SamplerTraits("DPM++ 2M", karras=True, eta=False),
    Sampler.lcm: SamplerTraits("LCM", karras=False, eta=False, max_steps=LCM_ORIGINAL_STEPS),
    Sampler.tcd: SamplerTraits("TCD", karras=False, eta=True, max_steps=LCM_ORIGINAL_STEPS),
}
SAMPLER_NAMES: tuple[str, ...] = tuple(s.value for s in SAMPLERS)
_ETA_SAMPLERS = frozenset(s.value for s, traits in SAMPLERS.items() if traits.eta)


def sampler(name: str) -> Sampler:
    """The sampler called ``name``; ValueError listing the valid names otherwise."""
    try:
        return Sampler(name)
    except ValueError:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}") from None


def check_sampler_options(name: str, *, karras: bool, eta: float) -> None:
    """ValueError when ``karras`` or a non-zero ``eta`` is asked of a sampler that does not take it."""
    s = sampler(name)
    traits = SAMPLERS[s]
    if karras and not traits.karras:
        takes = ", ".join(k.value for k, t in SAMPLERS.items() if t.karras)
        raise ValueError(f"karras sigmas apply to {takes}, not {s.value}")
    if eta and not traits.eta:
        takes = ", ".join(k.value for k, t in SAMPLERS.items() if t.eta)
        raise ValueError(f"eta applies to {takes} only, got eta {eta:g} with {s.value}")


def check_steps(name: str, steps: int) -> None:
    """ValueError when sampler ``name`` cannot run ``steps`` steps (LCM: at most its distillation schedule's 50)."""
    limit = SAMPLERS[sampler(name)].max_steps
    if steps > limit:
        raise ValueError(f"steps must be at most {limit} with sampler {name}, got {steps}")


def check_size_conditioning(name: str, value: tuple[int, int], crop: bool = False) -> None:
    """ValueError unless ``value`` (SDXL's size conditioning, two pixel counts) is in [1, MAX_CONDITIONING_SIDE]
    (a crop corner: [0, MAX_CONDITIONING_SIDE])."""
    low = 0 if crop else 1
    if not all(low <= v <= MAX_CONDITIONING_SIDE for v in value):
        raise ValueError(f"{name} values must be between {low} and {MAX_CONDITIONING_SIDE} pixels, got {list(value)}")


def check_side(name: str, value: int) -> None:
    """ValueError unless ``value`` is a multiple of SIDE_MULTIPLE in [MIN_SIDE, MAX_SIDE]."""
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    if value % SIDE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIDE_MULTIPLE}, got {value}")


def image_seeds(seed: int, n: int) -> list[int]:
    """The seed of each image of a request: image i uses seed + i, unwrapped (a CPU generator takes any of them)."""
    return [seed + i for i in range(n)]


def start_step(steps: int, strength: float) -> int:
    """The first denoising step an img2img / inpaint run takes: the last int(steps * strength) steps run, as in
    diffusers. Strength 1 starts at 0 (all steps, as txt2img); strength 0 starts at ``steps`` (none run)."""
    return steps - min(int(steps * strength), steps)


def batch_key(
    *, task: str, width: int, height: int, sampler: str, karras: bool, steps: int, strength: float, eta: float,
    refiner: str | None = None,
) -> str:
    """Requests with equal keys can run as one UNet batch: the same task, size, sampler and schedule.

    Guidance, prompts, seeds and image counts may differ inside a batch; the first step (img2img) and the eta of
    DDIM and TCD may not, since the pipeline runs one schedule and one eta per batch. ``strength`` is ignored for
    txt2img. ``refiner``: the SDXL refiner stage (``refiner_key``), which switches the whole batch at one step.
    """
    key = f"{task}:{width}x{height}:{sampler}:{int(karras)}:{steps}"
    if task != "txt2img":
        key += f":from{start_step(steps, strength)}"
    if sampler in _ETA_SAMPLERS:
        key += f":eta{eta:g}"
    if refiner is not None:
        key += f":refiner={refiner}"
    return key


def refiner_key(name: str, switch_at: float) -> str:
    """The refiner part of a batch key: its name and where the batch switches to it."""
    return f"{name}@{switch_at:g}"


def check_refiner_switch(switch_at: float) -> None:
    """ValueError unless ``switch_at`` (the share of the schedule the base runs before the refiner) is in
    [MIN_REFINER_SWITCH, MAX_REFINER_SWITCH]."""
    if not MIN_REFINER_SWITCH <= switch_at <= MAX_REFINER_SWITCH:
        raise ValueError(f"refiner switch_at must be between {MIN_REFINER_SWITCH} and {MAX_REFINER_SWITCH}, "
                         f"got {switch_at}")
