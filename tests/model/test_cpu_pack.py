"""CPU speed paths give the plain layers' numbers: pre-packed oneDNN weights, bf16 attention, glibc malloc tuning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import attention as attention_mod
from model.attention import attention
from model.cpu_pack import (
    PackedConv2d,
    PackedLinear,
    PackedPointwiseConv,
    PackedUpsample,
    can_prepack,
    prepack,
    subpixel_weight,
)
from model.device import keep_freed_memory
from model.layers import Upsample
from model.pipeline import Pipeline
from model.weights import load_components

pytestmark = pytest.mark.skipif(not can_prepack(torch.float32), reason="this PyTorch build has no oneDNN ops")


def packed_copy(module: nn.Module) -> tuple[nn.Module, int]:
    clone = copy.deepcopy(module)
    return clone, prepack(clone)


def test_packed_unet_vae_and_clip_equal_the_plain_networks(tiny_checkpoint: Path) -> None:
    c = load_components(tiny_checkpoint)
    unet, n_unet = packed_copy(c.unet)
    vae, n_vae = packed_copy(c.vae)
    text, n_text = packed_copy(c.text_encoder)
    assert n_unet > 20 and n_vae > 20 and n_text == 2 * (4 + 2)  # per CLIP layer: q, k, v, out, fc1, fc2
    assert isinstance(unet.input_blocks[0][0], PackedConv2d)  # type: ignore[index]
    assert isinstance(unet.time_embed[0], PackedLinear)  # type: ignore[index]
    assert isinstance(unet.input_blocks[1][1].proj_in, PackedPointwiseConv)  # type: ignore[index]
    assert isinstance(unet.output_blocks[1][-1], PackedUpsample)  # type: ignore[index]
    assert isinstance(vae.decoder.up[1].upsample, PackedUpsample)  # type: ignore[index,union-attr]
    with torch.inference_mode():
        # odd latent sizes and several batch sizes all run on weights packed once; at 9x11 the UNet upsamples
        # 5x6 to 9x11 (not 2x: the plain path), elsewhere by 2x (the sub-pixel path)
        for batch, h, w in ((1, 8, 8), (3, 9, 11), (2, 16, 12)):
            x, ctx, t = torch.randn(batch, 4, h, w), torch.randn(batch, 77, 32), torch.full((batch,), 321)
            assert torch.allclose(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
            z = torch.randn(batch, 4, h, w)
            assert torch.allclose(vae.decode(z), c.vae.decode(z), atol=1e-4, rtol=1e-4)
            pixels = torch.rand(batch, 3, 8 * h, 8 * w) * 2 - 1
            assert torch.allclose(vae.encode(pixels).mean, c.vae.encode(pixels).mean, atol=1e-4, rtol=1e-4)
        ids = torch.randint(0, 49407, (2, 77))
        ours, plain = text(input_ids=ids).last_hidden_state, c.text_encoder(input_ids=ids).last_hidden_state
        assert torch.allclose(ours, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="no bf16 oneDNN ops")
def test_packed_bf16_layers_match_plain_bf16() -> None:
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(64, 96, 3, padding=1).bfloat16(), nn.Linear(64, 128).bfloat16()
    x, rows = torch.randn(2, 64, 5, 7, dtype=torch.bfloat16), torch.randn(3, 10, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = PackedConv2d(conv)(x)
        assert out.shape == (2, 96, 5, 7) and out.dtype == torch.bfloat16
        assert torch.allclose(out.float(), conv(x).float(), atol=2e-2, rtol=2e-2)
        out = PackedLinear(linear)(rows)
        assert out.shape == (3, 10, 128)
        assert torch.allclose(out.float(), linear(rows).float(), atol=2e-2, rtol=2e-2)


def test_subpixel_upsample_is_the_plain_upsample() -> None:
    torch.manual_seed(2)
    up = Upsample(6)
    packed = PackedUpsample(up)
    x = torch.randn(2, 6, 5, 7)
    with torch.inference_mode():
        assert torch.allclose(packed(x), up(x), atol=1e-5, rtol=1e-5)  # 2x: sub-pixel convolution
        assert torch.allclose(packed(x, (9, 13)), up(x, (9, 13)), atol=1e-5, rtol=1e-5)  # other sizes: plain path
    assert subpixel_weight(up.conv.weight).shape == (24, 6, 2, 2)


def test_unpackable_layers_stay_plain() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1, stride=2),
                        nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 4).double())
    assert prepack(net) == 0
    assert not can_prepack(torch.float16) and not can_prepack(torch.float64)


@pytest.mark.parametrize("shape", [(2, 8, 64, 40, 64), (2, 8, 64, 40, 77), (1, 1, 100, 512, 100)])
def test_bf16_cpu_attention_matches_sdpa(
    shape: tuple[int, int, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    B, H, N, D, M = shape
    torch.manual_seed(1)
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, M, D), torch.randn(B, H, M, D)
    reference = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), reference)  # fp32 goes through SDPA itself
    whole = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    monkeypatch.setattr(attention_mod, "SCORE_ELEMENTS", B * H * M * 7)  # 7 query rows per chunk
    chunked = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert whole.dtype == chunked.dtype == torch.bfloat16 and whole.shape == (B, H, N, D)
    assert torch.equal(whole, chunked)  # chunking the rows changes nothing
    assert (whole.float() - reference).abs().max() < 3e-2


def test_pipeline_on_cpu_packs_its_networks(tiny_checkpoint: Path) -> None:
    pipe = Pipeline.load(tiny_checkpoint, device="cpu", dtype="float32")
    assert isinstance(pipe.components.unet.out[2], PackedConv2d)
    assert isinstance(pipe.components.vae.decoder.conv_out, PackedConv2d)


def test_glibc_keeps_freed_memory() -> None:
    libc = Path("/proc/self/maps").read_text()
    if "libc.so.6" not in libc:
        pytest.skip("not a glibc process")
    assert keep_freed_memory() is True
    # a block far over glibc's default 32 MiB mmap threshold comes from the heap now, not from its own mapping
    big = torch.empty(64 * 1024 * 1024, dtype=torch.uint8)
    address = big.data_ptr()
    maps = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
            if line.rstrip().endswith("[heap]")]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in maps)
