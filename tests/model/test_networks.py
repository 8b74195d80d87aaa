"""Our UNet, VAE and the CLIP text encoder give diffusers'/transformers' numbers on the same weights."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from model.unet import UNetConfig, UNetModel, timestep_embedding
from model.vae import AutoencoderKL, VAEConfig
from model.weights import Components, load_components
from tests.model.conftest import DiffusersModel, diffusers_unet_kwargs

TOLERANCE = 1e-4  # fp32, max abs difference


@pytest.fixture(scope="module")
def loaded(diffusers_model: DiffusersModel) -> Components:
    return load_components(diffusers_model.folder)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_sd15_parameter_counts_without_allocating() -> None:
    with torch.device("meta"):
        unet, vae = UNetModel(UNetConfig()), AutoencoderKL(VAEConfig())
    assert all(p.is_meta for p in [*unet.parameters(), *vae.parameters()])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert VAEConfig().downsample_factor == 8


def test_timestep_embedding_equals_diffusers_cos_first() -> None:
    t = torch.tensor([0, 1, 999, 500])
    ours = timestep_embedding(t, 320)
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert max_diff(ours, theirs) < 1e-6
    assert torch.equal(ours[0, :160], torch.ones(160))  # cos(0) first
    # fractional timesteps (Karras sigmas) are not rounded
    fractional, whole = timestep_embedding(torch.tensor([10.5]), 320), timestep_embedding(torch.tensor([10]), 320)
    assert not torch.allclose(fractional, whole)


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (5, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_unet_matches_diffusers(diffusers_model: DiffusersModel, loaded: Components, size: tuple[int, int]) -> None:
    """Odd latent sizes (520x520 images give 65x65 latents) upsample back to each skip connection's size."""
    torch.manual_seed(0)
    context_dim = diffusers_model.configs[0].context_dim
    x, context = torch.randn(2, 4, *size), torch.randn(2, 7, context_dim)
    t = torch.tensor([981, 1])
    with torch.no_grad():
        ours = loaded.unet(x, t, context)
        theirs = diffusers_model.unet(x, t, encoder_hidden_states=context).sample
    assert ours.shape == (2, 4, *size)
    assert ours.std() > 0.05  # a real signal, not a degenerate constant
    assert max_diff(ours, theirs) <= TOLERANCE


def test_unet_timesteps_scalar_or_float(loaded: Components) -> None:
    x = torch.randn(3, 4, 8, 8)
    context = torch.randn(3, 77, loaded.unet_config.context_dim)
    with torch.no_grad():
        per_sample = loaded.unet(x, torch.tensor([250, 250, 250]), context)
        scalar_float = loaded.unet(x, torch.tensor(250.0), context)
        other_t = loaded.unet(x, torch.tensor(10), context)
    assert max_diff(per_sample, scalar_float) < 1e-6
    assert max_diff(per_sample, other_t) > 1e-3


def test_vae_matches_diffusers(diffusers_model: DiffusersModel, loaded: Components) -> None:
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 48) * 2 - 1
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        posterior = loaded.vae.encode(image)
        reference = diffusers_model.vae.encode(image).latent_dist
        decoded = loaded.vae.decode(z)
        decoded_ref = diffusers_model.vae.decode(z).sample
    assert posterior.mean.shape == (2, 4, 8, 6)  # H/8 x W/8
    assert max_diff(posterior.mean, reference.mean) <= TOLERANCE
    assert max_diff(posterior.logvar, reference.logvar) <= TOLERANCE
    assert decoded.shape == (2, 3, 64, 48)
    assert max_diff(decoded, decoded_ref) <= TOLERANCE
    mean, logvar = posterior  # unpacks like a tuple
    assert mean is posterior.mean and logvar is posterior.logvar
    # A posterior sample equals diffusers' for the same standard normal draw (its sample() draws from the generator).
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    theirs = reference.sample(generator=torch.Generator().manual_seed(3))
    assert max_diff(posterior.sample(noise), theirs) <= TOLERANCE
    assert max_diff(theirs, reference.mean) > 0.1  # the draw matters: a sample is not the mean


def test_text_encoder_matches_transformers(diffusers_model: DiffusersModel, loaded: Components) -> None:
    positions = loaded.text_encoder.config.max_position_embeddings
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * (positions - 7)])
    with torch.no_grad():
        ours = loaded.text_encoder(input_ids=ids).last_hidden_state
        theirs = diffusers_model.text_encoder(input_ids=ids).last_hidden_state
    assert ours.shape == (1, positions, diffusers_model.configs[2].hidden_size)
    assert max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.slow
def test_full_sd15_unet_matches_diffusers() -> None:
    """SD 1.5's real architecture at a 32x32 latent, diffusers' random weights copied through our rename table."""
    from model import diffusers_format

    config = UNetConfig()
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(config)).eval()
    renames = diffusers_format.unet_renames(config)
    state = {str(diffusers_format.rename(k, renames)): v for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        ours = UNetModel(config)
    ours.load_state_dict(state, strict=True, assign=True)  # shares the reference's tensors: no second copy
    x, context, t = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768), torch.tensor([500])
    with torch.no_grad():
        assert max_diff(ours(x, t, context), reference(x, t, encoder_hidden_states=context).sample) <= TOLERANCE


@pytest.mark.slow
def test_full_sd_vae_matches_diffusers() -> None:
    from model import diffusers_format
    from tests.model.conftest import diffusers_vae_kwargs

    config = VAEConfig()
    torch.manual_seed(0)
    reference = diffusers.AutoencoderKL(**diffusers_vae_kwargs(config)).eval()
    renames = diffusers_format.vae_renames(config)
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    expected = ours.state_dict()
    state = {}
    for k, v in reference.state_dict().items():
        key = str(diffusers_format.rename(k, renames))
        state[key] = v.reshape(expected[key].shape)  # attention: linear [C, C] -> 1x1 conv [C, C, 1, 1]
    ours.load_state_dict(state, strict=True, assign=True)
    image, z = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert max_diff(ours.encode(image).mean, reference.encode(image).latent_dist.mean) <= TOLERANCE
        assert max_diff(ours.decode(z), reference.decode(z).sample) <= TOLERANCE
