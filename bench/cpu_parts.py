"""Where the CPU time goes: SD 1.5 parts at 256x256 and 512x512, against the measured fp32 matmul ceiling.

Parts: one UNet step (2 latents: CFG), one VAE decode (1 image), attention (SDPA vs two matrix products with the
softmax between them), GroupNorm and SiLU, the thread count, the allocator. Each part runs ours (the CPU path as
the pipeline sets it up: packed per the self-check's choice), our networks plain, and diffusers' where it has
one, alternately; medians of ``--runs``. GFLOP/s from ``torch.utils.flop_counter``; the ceiling is the best of
large fp32 matrix products on the same threads. oneDNN reads ``ONEDNN_MAX_CPU_ISA`` at start, so set it in the
environment to measure another instruction set's kernels (AVX2 on an AVX-512 CPU, say).

    ONEDNN_MAX_CPU_ISA=AVX2 python bench/cpu_parts.py --folder DIR [--sizes 256 512] [--runs 3] [--write]
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import cpu_kind, markdown_table, write_section
from model.unet import UNetModel
from model.vae import AutoencoderKL

log = logging.getLogger("bench.cpu_parts")

Run = Callable[[], object]


def timed(runs: dict[str, Run], n: int) -> dict[str, float]:
    """Median seconds of each, after one warm-up each, the runs alternating."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(n):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def flops(run: Run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def matmul_ceiling(n: int) -> float:
    """GFLOP/s of the best of several large fp32 matrix products, MKL's (``torch.mm``) and oneDNN's (a packed
    linear layer): the practical peak of these threads. Best, not median: a shared machine only ever slows it."""
    best = 0.0
    for size in (2048, 4096):
        a, b = torch.randn(size, size), torch.randn(size, size)
        packed = torch.ops.mkldnn._reorder_linear_weight(b, size)
        mkl = lambda: torch.mm(a, b)  # noqa: B023, E731  # run within this iteration only
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: B023, E731
        for run in (mkl, onednn):
            run()
            for _ in range(n):
                start = time.perf_counter()
                run()
                best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def isa_label() -> str:
    from model.cpu_choice import cpu_isa

    return cpu_isa()


class Table:
    """Rows of (part, implementation, seconds, FLOPs, note); rendered against the ceiling known at the end."""

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.rows: list[tuple[str, str, float, float | None, str]] = []

    def add(self, part: str, times: dict[str, float], work: float | None = None, note: str = "") -> None:
        for name, seconds in times.items():
            self.rows.append((part, name, seconds, work, note))
            log.info("%s %s: %.1f ms%s", part, name, 1e3 * seconds, f", {work / seconds / 1e9:.0f} GFLOP/s" if work
                     else "")

    def markdown(self) -> str:
        rows = [[part, name, f"{1e3 * seconds:.1f}", f"{work / 1e9:.0f}" if work else "",
                 f"{work / seconds / 1e9:.0f}" if work else "",
                 f"{100 * work / seconds / 1e9 / self.ceiling:.0f}%" if work else "", note]
                for part, name, seconds, work, note in self.rows]
        return markdown_table(["part", "implementation", "ms", "GFLOP", "GFLOP/s", "of ceiling", "note"], rows)


def networks(folder: Path, dtype: torch.dtype) -> tuple[UNetModel, UNetModel, AutoencoderKL, AutoencoderKL]:
    """Our UNet and VAE as the pipeline runs them on the CPU (packed, self-checked), and plain copies."""
    from model.cpu_tuning import tune_networks
    from model.weights import load_components

    c = load_components(folder, dtype=dtype)
    unet, vae = copy.deepcopy(c.unet), copy.deepcopy(c.vae)
    tune_networks([(unet, dtype, False), (vae, dtype, False)])
    return unet, c.unet, vae, c.vae


def parts(folder: Path, size: int, runs: int, dtype: torch.dtype, table: Table) -> None:
    import diffusers

    s = size // 8
    x, t, ctx = torch.randn(2, 4, s, s, dtype=dtype), torch.full((2,), 500), torch.randn(2, 77, 768, dtype=dtype)
    z = torch.randn(1, 4, s, s, dtype=dtype)
    unet, plain_unet, vae, plain_vae = networks(folder, dtype)
    for _ in range(2):  # the self-check: the first pass measures, the second runs the chosen paths
        unet(x, t, ctx)
        vae.decode(z)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
    theirs = theirs.eval().to(dtype)
    work = flops(lambda: plain_unet(x, t, ctx))
    table.add(f"UNet step {size}", timed({
        "ours": lambda: unet(x, t, ctx), "ours plain": lambda: plain_unet(x, t, ctx),
        "diffusers": lambda: theirs(x, t, ctx, return_dict=False)}, runs), work)
    one = torch.get_num_threads()
    torch.set_num_threads(1)
    table.add(f"UNet step {size}", timed({"ours, 1 thread": lambda: unet(x, t, ctx)}, max(1, runs // 2)), work)
    torch.set_num_threads(one)
    vae_theirs = diffusers.AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).eval().to(dtype)
    work = flops(lambda: plain_vae.decode(z))
    table.add(f"VAE decode {size}", timed({
        "ours": lambda: vae.decode(z), "ours plain": lambda: plain_vae.decode(z),
        "diffusers": lambda: vae_theirs.decode(z, return_dict=False)}, runs), work, "FLOPs of the plain decode")


def two_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.matmul(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).softmax(-1), v)


def attention_parts(size: int, runs: int, dtype: torch.dtype, table: Table) -> None:
    """Self-attention of the UNet's first level (8 heads of 40 over (size/8)^2 positions, 2 latents) and of the
    VAE's middle block (1 head of 512 over (size/8)^2 positions)."""
    from model.cpu_attention import onednn_attention

    n = (size // 8) ** 2
    for name, (B, H, D) in (("UNet level-1 self-attention", (2, 8, 40)), ("VAE mid attention", (1, 1, 512))):
        q, k, v = (torch.randn(B, H, n, D, dtype=dtype) for _ in range(3))
        ways: dict[str, Run] = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v),  # noqa: B023
                                "two matmuls": lambda: two_matmuls(q, k, v)}  # noqa: B023
        if dtype == torch.float32:  # the self-check's other fp32 path (model/cpu_attention.py)
            ways["oneDNN, query chunks"] = lambda: onednn_attention(q, k, v)  # noqa: B023
        table.add(f"{name} {size}", timed(ways, runs), 4.0 * B * H * n * n * D)


def elementwise_parts(size: int, runs: int, dtype: torch.dtype, table: Table) -> None:
    """GroupNorm(32) and SiLU at the UNet's first level and the VAE decoder's last: memory-bound, so GB/s."""
    for name, shape in (("UNet 320ch", (2, 320, size // 8, size // 8)), ("VAE 128ch", (1, 128, size, size))):
        a = torch.randn(*shape, dtype=dtype)
        norm = torch.nn.GroupNorm(32, shape[1]).to(dtype)
        times = timed({"GroupNorm": lambda: norm(a), "SiLU": lambda: F.silu(a)}, runs)  # noqa: B023
        gb = a.numel() * a.element_size() * 2 / 1e9  # one read, one write
        table.add(f"{name} {size}", times, None, f"{', '.join(f'{k} {gb / s:.1f} GB/s' for k, s in times.items())}")


def allocator_part(runs: int, table: Table) -> None:
    """SiLU on a 134 MB tensor (the VAE's last level at 512x512) before and after glibc keeps freed memory."""
    from model.device import keep_freed_memory

    a = torch.randn(1, 128, 512, 512)
    before = timed({"SiLU, glibc default": lambda: F.silu(a)}, runs)
    keep_freed_memory()
    after = timed({"SiLU, freed memory kept": lambda: F.silu(a)}, runs)
    table.add("allocator", {**before, **after})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True, help="a diffusers folder (bench/model_vs_diffusers.py)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    torch.set_grad_enabled(False)
    load_before = os.getloadavg()
    table = Table(matmul_ceiling(args.runs))
    log.info("fp32 matmul ceiling: %.0f GFLOP/s", table.ceiling)
    allocator_part(args.runs, table)
    from model.device import keep_freed_memory
    from model.threads import set_cpu_threads

    keep_freed_memory()
    threads = set_cpu_threads()
    for size in args.sizes:
        attention_parts(size, args.runs, dtype, table)
        elementwise_parts(size, args.runs, dtype, table)
        parts(args.folder, size, args.runs, dtype, table)
    load_after = os.getloadavg()
    table.ceiling = max(table.ceiling, matmul_ceiling(args.runs))  # again at the end: the better of the two
    body = (
        f"{isa_label()}; {args.dtype}; threads {threads}; torch {torch.__version__}; median of {args.runs} "
        f"alternating runs after a warm-up. fp32 matmul ceiling (the best large `torch.mm` or oneDNN linear, at "
        f"the start and the end): **{table.ceiling:.0f} GFLOP/s**. Load average {load_before[0]:.2f} at the "
        f"start, {load_after[0]:.2f} at the end. UNet step: 2 "
        f"latents (CFG); VAE decode: 1 image. \"ours\" is the CPU path as the pipeline sets it up (per-kind "
        f"self-check done), \"ours plain\" the same networks unpacked.\n\n"
        + table.markdown()
    )
    log.info("\n%s", body)
    if args.write:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        kernels = f"ONEDNN_MAX_CPU_ISA={isa}" if isa else "native ISA"
        sizes = ", ".join(f"{size}x{size}" for size in args.sizes)
        write_section(f"Model speed on the CPU: where the time goes ({cpu_kind()}, {kernels}, {args.dtype}, {sizes})",
                      body)


if __name__ == "__main__":
    main()
