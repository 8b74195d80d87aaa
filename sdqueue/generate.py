"""`sdqueue generate`: run the pipeline locally, no server, and write the images."""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path

from PIL import Image

from core.rules import SAMPLER_NAMES

log = logging.getLogger(__name__)




def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--checkpoint", default=os.environ.get("SDQ_CHECKPOINT"),
                   help="SD 1.x .safetensors file or diffusers folder (default: $SDQ_CHECKPOINT)")
    p.add_argument("-o", "--output", default="out.png", help="output PNG; with --n > 1 files are numbered")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="euler_a")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: random)")
    p.add_argument("--width", type=int, default=None, help="default: the init image's width, else 512")
    p.add_argument("--height", type=int, default=None, help="default: the init image's height, else 512")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default=os.environ.get("SDQ_DTYPE", "auto"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=os.environ.get("SDQ_DEVICE", "auto"))
    p.add_argument("--init-image", type=Path, default=None, help="img2img / inpaint source image")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the init image is re-drawn (default 0.75 img2img, 1.0 inpaint)")
    p.add_argument("--mask", type=Path, default=None, help="inpaint mask: white = repaint")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt pickles (loaded with weights_only)")


def output_paths(output: Path, n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(n)]


class ProgressBar:
    """A one-line text progress bar on stderr."""

    def __init__(self, width: int = 30) -> None:
        self.width = width

    def __call__(self, step: int, total: int) -> None:
        done = int(self.width * step / max(total, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{total} steps")
        if step >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    from model.pipeline import Pipeline
    from model.requests import GenerationRequest, StepEvent, Task

    if not args.checkpoint:
        log.error("no checkpoint: pass --checkpoint PATH or set SDQ_CHECKPOINT")
        return 2
    init = Image.open(args.init_image).convert("RGB") if args.init_image else None
    mask = Image.open(args.mask).convert("L") if args.mask else None
    if mask is not None and init is None:
        log.error("--mask needs --init-image")
        return 2
    width = args.width or (init.width // 8 * 8 if init else 512)
    height = args.height or (init.height // 8 * 8 if init else 512)
    if init is not None and init.size != (width, height):
        init = init.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None and mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    task: Task = "inpaint" if mask is not None else "img2img" if init is not None else "txt2img"
    strength = args.strength if args.strength is not None else (1.0 if task == "inpaint" else 0.75)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, task=task, width=width, height=height,
        steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, karras=args.karras,
        eta=args.eta, seed=seed, n=args.n, strength=strength, init_image=init, mask=mask,
    )
    try:
        pipe = Pipeline.load(args.checkpoint, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
        pipe.check(request)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    bar = ProgressBar()

    def on_step(event: StepEvent) -> None:
        bar(event.step, event.total)

    result = pipe.generate([request], callback=on_step)[0]
    assert result is not None  # nothing cancels a local run
    if result.prompt_truncated:
        log.warning("the prompt was longer than 77 CLIP tokens and was truncated")
    for path, image, image_seed in zip(output_paths(Path(args.output), args.n), result.images, result.seeds,
                                       strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"{path}  seed={image_seed}")
    return 0
