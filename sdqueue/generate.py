"""`sdqueue generate`: run the pipeline locally, no server, and write the images."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from core.jobs import GenerationParams
from core.rules import SAMPLER_NAMES
from sdqueue.progress import StepBar

log = logging.getLogger(__name__)

# Options of both `generate` and `submit`, by their GenerationParams field names. Left unset they are None: `submit`
# then lets the server apply its defaults, and `generate` takes the same ones from `core.jobs` (`_DEFAULTS`).
_FIELDS = {"negative_prompt": str, "steps": int, "eta": float, "seed": int, "width": int, "height": int,
           "guidance_scale": float, "n": int}
_DEFAULTS = {name: field.default for name, field in GenerationParams.model_fields.items()}


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The prompt, the generation options, the init image and mask, and the output path."""
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-o", "--output", default=None,
                   help="output file (default out.png); with --n > 1 files are numbered: out-0.png, out-1.png, ...")
    helps = {"seed": "image i uses seed + i (default: random)", "eta": "DDIM eta, TCD gamma (default 0)",
             "n": "number of images (default 1)"}
    for side in ("width", "height"):
        helps[side] = f"default: the init image's {side}, else the model's own ({_DEFAULTS[side]}; SDXL 1024)"
    for name, kind in _FIELDS.items():
        default = _DEFAULTS[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=helps.get(name, f"default {default!r}" if default != "" else "default: none"))
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help=f"default {_DEFAULTS['sampler'].value}")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--init-image", type=Path, default=None, help="img2img / inpaint source image")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the init image is re-drawn (default 0.75 img2img, 1.0 inpaint)")
    p.add_argument("--mask", type=Path, default=None, help="inpaint mask: white = repaint")


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options set on the command line, by field name."""
    names = [*_FIELDS, "sampler", "karras"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_generation_options(p)
    p.add_argument("--checkpoint", default=os.environ.get("SDQ_CHECKPOINT"),
                   help="SD 1.x .safetensors file or diffusers folder (default: $SDQ_CHECKPOINT)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default=os.environ.get("SDQ_DTYPE", "auto"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=os.environ.get("SDQ_DEVICE", "auto"))
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickles (loaded with weights_only)")
    p.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"),
                   default=os.environ.get("SDQ_PREDICTION_TYPE", "auto"),
                   help="what the UNet predicts; auto: the folder's scheduler config, or for a single SD 2.x file a "
                   "probe of the UNet (default: $SDQ_PREDICTION_TYPE or auto)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA .safetensors file (kohya / A1111 or diffusers), scale default 1; repeatable")
    p.add_argument("--lora-dir", type=Path, default=os.environ.get("SDQ_LORA_DIR"),
                   help="where <lora:name:weight> tags in the prompt find name.safetensors (default: $SDQ_LORA_DIR)")
    p.add_argument("--tiny-vae", type=Path, default=None, metavar="PATH",
                   help="decode (and encode the init image) with TAESD: a diffusers AutoencoderTiny folder, or "
                   "taesd_encoder/decoder.safetensors (their folder or either file); pairs well with --sampler lcm")
    p.add_argument("--cpu-choices", default=os.environ.get("SDQ_CPU_CHOICES", ""), metavar="FILE",
                   help="on the CPU, where the start-up self-check keeps its choices for later runs; off = measure "
                   "every run (default: $SDQ_CPU_CHOICES, else ~/.cache/sdqueue/cpu-choices.json)")


def output_paths(output: Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]


def lora_option(value: str) -> tuple[Path, float]:
    """``--lora PATH[:SCALE]``: the scale is what follows the last colon when it is a number."""
    path, _, scale = value.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def run(args: argparse.Namespace) -> int:
    from core.loras import prompt_loras
    from model.cpu_choice_store import resolve_path as resolve_choices_path
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest, LoraRef, StepEvent, Task

    if not args.checkpoint:
        log.error("no checkpoint: pass --checkpoint PATH or set SDQ_CHECKPOINT")
        return 2
    init = Image.open(args.init_image).convert("RGB") if args.init_image else None
    mask = Image.open(args.mask).convert("L") if args.mask else None
    if mask is not None and init is None:
        log.error("--mask needs --init-image")
        return 2
    width = args.width or (init.width // 8 * 8 if init else _DEFAULTS["width"])
    height = args.height or (init.height // 8 * 8 if init else _DEFAULTS["height"])
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None and mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    task: Task = "inpaint" if mask is not None else "img2img" if init is not None else "txt2img"
    strength = args.strength if args.strength is not None else (1.0 if task == "inpaint" else 0.75)
    o = {**_DEFAULTS, "sampler": _DEFAULTS["sampler"].value, **given_options(args)}
    seed = o["seed"] if o["seed"] is not None else random.randrange(2**32)
    try:
        prompt, tagged = prompt_loras(args.prompt)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    loras = [LoraRef(path.stem, scale, path) for path, scale in map(lora_option, args.lora)]
    loras += [LoraRef(t.name, t.scale) for t in tagged]
    request = GenerationRequest(
        prompt=prompt, negative_prompt=o["negative_prompt"], task=task, width=width, height=height,
        steps=o["steps"], guidance_scale=o["guidance_scale"], sampler=o["sampler"], karras=o["karras"], eta=o["eta"],
        seed=seed, n=o["n"], strength=strength, init_image=init, mask=mask, loras=loras,
        vae="tiny" if args.tiny_vae else "full",
    )
    try:
        pipe = Pipeline.load(args.checkpoint, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                             tiny_vae=args.tiny_vae, prediction_type=args.prediction_type,
                             cpu_choices=resolve_choices_path(args.cpu_choices))
        pipe.loras.configure(args.lora_dir, pipe.loras.max_bytes)
        if task == "txt2img" and not args.width and not args.height:  # the model's own size (SDXL 1024)
            request.width = request.height = pipe.default_size
        pipe.check(request)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    bar = StepBar(request.steps)

    def on_step(event: StepEvent) -> None:
        bar.update(event.step, event.total)

    try:
        result = pipe.generate([request], callback=on_step)[0]
    finally:
        bar.close()
    assert result is not None  # nothing cancels a local run
    for warning in result.warnings():
        log.warning("%s", warning)
    for path, image, image_seed in zip(output_paths(Path(args.output or "out.png"), request.n), result.images,
                                       result.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        sys.stdout.write(f"{path}  seed={image_seed}\n")
    return 0
