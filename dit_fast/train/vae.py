"""The Stable Diffusion VAE (diffusers AutoencoderKL) that maps images to DiT's latent space."""
from typing import Tuple

import torch

VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
DEFAULT_SCALE = 0.18215  # the official latent scale of the SD VAE


def load_vae(spec: str, device: torch.device):
    """AutoencoderKL.from_pretrained(spec): 'ema'/'mse' (the official choices), a hub id or a local
    directory. Returned frozen, in eval mode, on `device`. Errors name the --vae argument."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ValueError("--vae: encoding images needs diffusers (pip install diffusers); or train on "
                         "pre-extracted latents") from None
    name = VAE_ALIASES.get(spec, spec)
    try:
        import importlib.util

        # low_cpu_mem_usage needs `accelerate`; without it diffusers warns and falls back anyway
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as e:  # offline hub, missing directory, wrong files: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--vae {spec!r}: cannot load an AutoencoderKL from {name!r}: {first}") from None
    vae.requires_grad_(False)
    return vae.eval().to(device)


def vae_scale(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE)


def vae_geometry(vae, image_size: int) -> Tuple[int, int]:
    """(latent channels, latent size) for square images of `image_size` pixels."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} must be divisible by the VAE's downsampling factor {factor}")
    return int(vae.config.latent_channels), image_size // factor


@torch.no_grad()
def encode(vae, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The official train.py encoding: a sample of the posterior, times the latent scale."""
    return vae.encode(x).latent_dist.sample().mul_(scale)


@torch.no_grad()
def encode_moments(vae, x: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and standard deviation: mean + std * N(0, I) is a scaled sample."""
    dist = vae.encode(x).latent_dist
    return dist.mean * scale, dist.std * scale
