"""fp32 CPU attention from oneDNN matrix products: the same numbers as SDPA, and chosen per machine by measuring."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import cpu_attention
from model.cpu_attention import ChosenAttention, can_use_onednn_attention, eligible, onednn_attention
from model.cpu_choice import LayerPath, PathChooser
from model.cpu_tuning import tune_networks
from model.weights import load_components

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")


def test_the_start_up_check_passes_where_onednn_is_built_in() -> None:
    assert can_use_onednn_attention()


def qkv(batch: int, heads: int, n: int, m: int, d: int) -> list[torch.Tensor]:
    """As the UNet makes them: [B, tokens, heads, d] projections viewed as [B, heads, tokens, d]."""
    g = torch.Generator().manual_seed(n + m + d)
    return [torch.randn(batch, t, heads, d, generator=g).transpose(1, 2) for t in (n, m, m)]


@pytest.mark.parametrize(("batch", "heads", "n", "m", "d"), [(2, 8, 1024, 1024, 40), (1, 1, 300, 1100, 64),
                                                            (3, 2, 77, 2048, 16)])
def test_the_same_as_sdpa_in_every_chunking(monkeypatch: pytest.MonkeyPatch, batch: int, heads: int, n: int,
                                            m: int, d: int) -> None:
    q, k, v = qkv(batch, heads, n, m, d)
    want = F.scaled_dot_product_attention(q, k, v)
    for elements in (cpu_attention.SCORE_ELEMENTS, 97 * m, m):  # one chunk; chunks with a short last one; rows of 1
        monkeypatch.setattr(cpu_attention, "SCORE_ELEMENTS", elements)
        got = onednn_attention(q, k, v)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # the callers' next step: back to [B, tokens, heads * d] without another copy
    assert got.transpose(1, 2).is_contiguous()


def test_only_fp32_self_attention_with_enough_keys_takes_part() -> None:
    q, k, _ = qkv(1, 2, 8, cpu_attention.MIN_KEYS, 8)
    assert eligible(q, k, None)
    assert not eligible(q.bfloat16(), k.bfloat16(), None)  # bf16: model.attention's own path
    assert not eligible(q, k, torch.ones(1, k.shape[2], dtype=torch.bool))  # a key mask: text cross-attention
    assert not eligible(q, k[:, :, :77], None)  # 77 keys: one prompt chunk


def test_the_first_call_measures_both_and_later_calls_take_the_choice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cpu_attention, "onednn_attention", lambda q, k, v: calls.append("onednn") or q)
    monkeypatch.setattr(cpu_attention, "attention", lambda q, k, v, *a, **kw: calls.append("sdpa") or q)
    chooser = PathChooser("UNet", budget_s=1e9)
    first, second = ChosenAttention(chooser), ChosenAttention(chooser)
    q, k, v = qkv(1, 1, 4, cpu_attention.MIN_KEYS, 8)
    with caplog.at_level(logging.INFO, logger="model.cpu_choice"):
        first(q, k, v)
        second(q, k, v)
        # each measured layer: both untimed, then timed twice each, the order reversed the second time
        assert calls == ["onednn", "sdpa", "sdpa", "onednn", "onednn", "sdpa"] * 2
        assert "attention" not in chooser.decided
        calls.clear()
        first(q, k, v)  # its second call: the network's first pass is over
    decided = chooser.decided["attention"]
    assert calls == ["onednn" if decided is LayerPath.PACKED else "sdpa"]
    assert f"UNet attention layers: {decided.value} (measured on 2 layers" in caplog.text
    calls.clear()
    first(q, k[:, :, :77], v[:, :, :77])  # not eligible: SDPA, nothing measured
    assert calls == ["sdpa"] and chooser.totals["attention"].layers == 2


@pytest.mark.parametrize("path", [LayerPath.PACKED, LayerPath.PLAIN])
def test_a_network_on_either_path_gives_the_plain_networks_numbers(tiny_checkpoint: Path,
                                                                  path: LayerPath) -> None:
    """At a 32x32 latent the UNet's first level and the VAE's mid-block attend over 1024 tokens: eligible."""
    c = load_components(tiny_checkpoint)
    unet, vae = copy.deepcopy(c.unet), copy.deepcopy(c.vae)
    choosers = tune_networks([(unet, torch.float32, False), (vae, torch.float32, False)])
    for chooser in choosers:
        chooser.decided["attention"] = path
    assert sum(isinstance(getattr(m, "cpu_attention", None), ChosenAttention) for m in unet.modules()) > 2
    x, ctx, t = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32), torch.full((2,), 321)
    z = torch.randn(1, 4, 32, 32)
    runs: list[str] = []
    real = cpu_attention.onednn_attention

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        runs.append("onednn")
        return real(q, k, v)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_attention, "onednn_attention", counted)
        torch.testing.assert_close(unet(x, t, ctx), c.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vae.decode(z), c.vae.decode(z), atol=1e-4, rtol=1e-4)
    assert (len(runs) > 0) is (path is LayerPath.PACKED)


def test_bf16_networks_keep_their_own_attention(tiny_checkpoint: Path) -> None:
    c = load_components(tiny_checkpoint, dtype=torch.bfloat16)
    tune_networks([(c.unet, torch.bfloat16, False)])
    assert all(getattr(m, "cpu_attention", None) is None for m in c.unet.modules())
