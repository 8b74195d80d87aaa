"""Ours vs OpenVINO on the same CPU and the same work: SD 1.5-size UNet step and VAE decode, static shapes.

OpenVINO is what CPU users reach for. Its models here are converted offline from the same diffusers folder
(``openvino.convert_model`` on diffusers' own UNet and VAE decoder, the conversion ``optimum-intel`` runs), with
static input shapes, compiled for latency on the same threads; no hub download. fp32 runs with OpenVINO's
``INFERENCE_PRECISION_HINT`` f32 (it would pick bf16 by itself on a CPU that has it); ``--dtype bfloat16``
compares both in bf16. A steady-state image is 4 UNet steps (2 latents: CFG) and one decode. Bench-only
dependency: ``pip install -e '.[bench]'``.

    python bench/openvino_compare.py --folder DIR [--sizes 256 512] [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_parts import networks, timed
from bench.report import cpu_kind, markdown_table, write_section

log = logging.getLogger("bench.openvino")

STEPS = 4


class UNetCall(nn.Module):
    """diffusers' UNet with a plain tensor output, as the converter wants."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, ctx, return_dict=False)[0]


class DecodeCall(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def convert(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    """Convert to OpenVINO IR with static shapes, saved as fp32 (no fp16 weight compression)."""
    import openvino as ov

    with torch.no_grad():
        model = ov.convert_model(module, example_input=inputs, input=[tuple(i.shape) for i in inputs])
    ov.save_model(model, str(path), compress_to_fp16=False)


def compiled(path: Path, precision: str, threads: int) -> Any:
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads})


def compare(folder: Path, size: int, runs: int, dtype: torch.dtype, workdir: Path) -> list[list[str]]:
    import diffusers

    s = size // 8
    x, t, ctx = torch.randn(2, 4, s, s), torch.full((2,), 500), torch.randn(2, 77, 768)
    z = torch.randn(1, 4, s, s)
    unet_ir, vae_ir = workdir / f"unet_{size}.xml", workdir / f"vae_{size}.xml"
    if not unet_ir.exists():
        log.info("converting the UNet and the VAE decoder at %dx%d", size, size)
        unet = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).eval()
        convert(UNetCall(unet), (x, t, ctx), unet_ir)
        del unet
        vae = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).eval()
        convert(DecodeCall(vae), (z,), vae_ir)
        del vae
        gc.collect()
    precision = "f32" if dtype == torch.float32 else "bf16"
    threads = torch.get_num_threads()
    ov_unet, ov_vae = compiled(unet_ir, precision, threads), compiled(vae_ir, precision, threads)
    inputs = [x.numpy(), t.numpy(), ctx.numpy()]
    ours_unet, _, ours_vae, _ = networks(folder, dtype)
    xd, ctxd, zd = x.to(dtype), ctx.to(dtype), z.to(dtype)
    with torch.inference_mode():
        for _ in range(2):  # the self-check: the first pass measures, the second runs the chosen paths
            ours_unet(xd, t, ctxd)
            ours_vae.decode(zd)
        step = timed({"ours": lambda: ours_unet(xd, t, ctxd), "OpenVINO": lambda: ov_unet(inputs)}, runs)
        decode = timed({"ours": lambda: ours_vae.decode(zd), "OpenVINO": lambda: ov_vae([z.numpy()])}, runs)
    rows = []
    for name in ("ours", "OpenVINO"):
        image = STEPS * step[name] + decode[name]
        rows.append([f"{size}x{size}", name, f"{step[name]:.2f}", f"{decode[name]:.2f}", f"{image:.2f}",
                     f"{(STEPS * step['OpenVINO'] + decode['OpenVINO']) / image:.2f}x"])
        log.info("%d %s: step %.2f s, decode %.2f s, image %.2f s", size, name, step[name], decode[name], image)
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True, help="a diffusers folder (bench/model_vs_diffusers.py)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--ir", type=Path, default=None, help="keep converted models here (default: a temp dir)")
    parser.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    args = parser.parse_args()
    import openvino as ov

    from model.cpu_choice import cpu_isa
    from model.device import keep_freed_memory
    from model.threads import set_cpu_threads

    keep_freed_memory()
    threads = set_cpu_threads()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    tmp = tempfile.TemporaryDirectory() if args.ir is None else None
    workdir = args.ir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows = [row for size in args.sizes for row in compare(args.folder, size, args.runs, dtype, workdir)]
    hint = "f32" if dtype == torch.float32 else "bf16"
    body = (
        f"SD 1.5-size random weights, {args.dtype} (OpenVINO INFERENCE_PRECISION_HINT {hint}), "
        f"static shapes; threads {threads}; {cpu_isa()}; torch {torch.__version__}, OpenVINO {ov.__version__}; "
        f"median of {args.runs} alternating runs after a warm-up; load average {load_before:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end. Image = {STEPS} UNet steps + 1 decode.\n\n"
        + markdown_table(["size", "implementation", "UNet step s", "VAE decode s", "image s",
                          "speed vs OpenVINO"], rows)
    )
    print(body)
    if args.write:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        kernels = f"ONEDNN_MAX_CPU_ISA={isa}" if isa else "native ISA"
        sizes = ", ".join(f"{size}x{size}" for size in args.sizes)
        write_section(f"Model: sdqueue vs OpenVINO ({cpu_kind()}, {kernels}, {args.dtype}, {sizes})", body)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
