"""Sliced and tiled VAE decoding (model/vae_decode.py): slices give the batch decode exactly, tiles give diffusers'
tiled decode of the same weights and stay close to the whole-image decode."""

from __future__ import annotations

import pytest
import torch

from model.vae_decode import decode_latents, slice_rows, sliced_decode, tiled_decode
from model.weights import Components, load_components
from tests.model.conftest import CONFIGS, DiffusersModel, write_diffusers_folder

TILE = 8  # latent pixels per tile side: the tiny VAE's sample_size 64 / 8, what diffusers tiles it with
# Tiled vs whole decode of the tiny random VAE, 448x448 in 3x3 tiles of 256 pixels: each tile normalises its own
# features, so pixels differ. Measured over 3 seeds: mean |diff| 0.039..0.042 (the image's mean |value| is 0.255),
# max 0.85..1.12; without the overlap blend the mean is 0.076. Half-way between bounds what blending buys.
CLOSE_TILE = 32
TILED_MEAN_TOLERANCE = 0.055


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusersModel, Components]:
    reference = write_diffusers_folder("tiny", tmp_path_factory.mktemp("tiny"), CONFIGS["tiny"])
    return reference, load_components(reference.folder)


def latents(batch: int, side: int) -> torch.Tensor:
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(7))


def test_sliced_decode_equals_the_batch_decode(model: tuple[DiffusersModel, Components]) -> None:
    vae = model[1].vae
    z = latents(5, 8)
    calls: list[int] = []

    def decode(part: torch.Tensor) -> torch.Tensor:
        calls.append(part.shape[0])
        return vae.decode(part)

    with torch.inference_mode():
        whole = vae.decode(z)
        sliced = sliced_decode(decode, z, rows=2)
    assert calls == [2, 2, 1]
    # oneDNN picks its convolution kernels per batch size, so rows differ from the 5-image call by float rounding
    # (~1e-7) on the CPU; a mixed-up or missing slice differs by ~1
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)
    assert torch.equal(sliced[4:], vae.decode(z[4:]))  # each slice is exactly its own call


def test_tiled_decode_is_diffusers_tiled_decode(model: tuple[DiffusersModel, Components]) -> None:
    reference, ours = model
    z = latents(2, 20)  # 160x160 pixels: 3x3 tiles of 8 latent pixels every 6
    reference.vae.enable_tiling()
    assert reference.vae.tile_latent_min_size == TILE
    with torch.inference_mode():
        theirs = reference.vae.decode(z).sample
        tiled = tiled_decode(ours.vae.decode, z, TILE)
    assert tiled.shape == (2, 3, 160, 160)
    torch.testing.assert_close(tiled, theirs, rtol=1e-4, atol=1e-4)


def test_tiled_decode_is_close_to_the_whole_decode(model: tuple[DiffusersModel, Components]) -> None:
    vae = model[1].vae
    z = latents(1, 56)  # tiles start at 0, 24, 48 along each side
    with torch.inference_mode():
        whole = vae.decode(z)
        tiled = tiled_decode(vae.decode, z, CLOSE_TILE)
        unblended = tiled_decode(vae.decode, z, CLOSE_TILE, overlap=0.0)
    assert tiled.shape == whole.shape == (1, 3, 448, 448)
    assert (tiled - whole).abs().mean() < TILED_MEAN_TOLERANCE
    assert (unblended - whole).abs().mean() > TILED_MEAN_TOLERANCE  # the overlap is what keeps seams down


def test_size_thresholds_pick_slices_and_tiles() -> None:
    assert slice_rows(512, 512) == 4
    assert slice_rows(1024, 1024) == 1
    assert slice_rows(256, 256) == 16
    seen: list[tuple[int, ...]] = []

    def decode(z: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(z.shape))
        return torch.zeros(z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8)

    assert decode_latents(decode, torch.zeros(6, 4, 64, 64)).shape == (6, 3, 512, 512)
    assert seen == [(4, 4, 64, 64), (2, 4, 64, 64)]
    seen.clear()
    assert decode_latents(decode, torch.zeros(1, 4, 128, 128)).shape == (1, 3, 1024, 1024)
    assert seen == [(1, 4, 128, 128)]  # 1024x1024 still decodes whole
    seen.clear()
    assert decode_latents(decode, torch.zeros(1, 4, 192, 128)).shape == (1, 3, 1536, 1024)
    # tiles of 64 latent pixels every 48: rows start at 0, 48, 96, 144 and columns at 0, 48, 96
    assert seen == [(1, 4, h, w) for h in (64, 64, 64, 48) for w in (64, 64, 32)]


def test_whole_decode_path_unchanged(model: tuple[DiffusersModel, Components]) -> None:
    vae = model[1].vae
    z = latents(3, 8)
    with torch.inference_mode():
        assert torch.equal(decode_latents(vae.decode, z), vae.decode(z))
