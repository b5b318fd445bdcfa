# Probability helpers for the Gaussian diffusion process.
#
# The math follows facebookresearch/DiT `diffusion/diffusion_utils.py`, which was adapted from
# OpenAI's diffusion code (MIT license):
#     GLIDE: https://github.com/openai/glide-text2im/blob/main/glide_text2im/gaussian_diffusion.py
#     ADM:   https://github.com/openai/guided-diffusion/blob/main/guided_diffusion
#     IDDPM: https://github.com/openai/improved-diffusion/blob/main/improved_diffusion/gaussian_diffusion.py
# Re-implemented for dit_fast; results match the official functions.

from __future__ import annotations

import math
from typing import Union

import torch

__all__ = [
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
]

TensorOrFloat = Union[torch.Tensor, float]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(
    mean1: TensorOrFloat, logvar1: TensorOrFloat, mean2: TensorOrFloat, logvar2: TensorOrFloat
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise with broadcasting.

    At least one argument must be a tensor; scalars are promoted to it.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl: at least one of mean1, logvar1, mean2, logvar2 must be a Tensor")
    # exp() needs tensors; the means broadcast on their own.
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def continuous_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log density (nats) of `x` under N(means, exp(log_scales)^2), evaluated on the standardized value."""
    normalized_x = (x - means) * torch.exp(-log_scales)
    return torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x)).log_prob(normalized_x)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats) of `x` (uint8 images rescaled to [-1, 1]) under a Gaussian
    discretized into 256 bins; the edge bins extend to +-infinity."""
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood: x, means and log_scales must have the same shape, "
            f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
