# Diffusion entry point, API-compatible with facebookresearch/DiT `diffusion/__init__.py`
# (whose diffusion code is adapted from OpenAI's GLIDE / ADM / IDDPM repositories, MIT license).
# Re-implemented for dit_fast.

from __future__ import annotations

from typing import Optional, Sequence, Union

from . import gaussian_diffusion as gd
from .dpm_solver import DPMSolverPlusPlus, create_dpm_solver
from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps
from .timestep_sampler import create_named_schedule_sampler

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "create_named_schedule_sampler",
    "create_dpm_solver",
    "DPMSolverPlusPlus",
]


def create_diffusion(
    timestep_respacing: Optional[Union[str, int, Sequence[int]]],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion used by DiT.

    :param timestep_respacing: "" or None for all `diffusion_steps` steps; otherwise a respacing
        such as "250" (or 250), "ddim50" or "10,10,10" (see `space_timesteps`).
    :param noise_schedule: "linear" or "squaredcos_cap_v2" (cosine).
    :param use_kl: train on the (rescaled) variational bound instead of the MSE.
    :param sigma_small: with fixed variance, use the posterior variance instead of beta_t.
    :param predict_xstart: the model predicts x_0 instead of epsilon.
    :param learn_sigma: the model also outputs a learned-range variance (2x channels).
    :param rescale_learned_sigmas: rescale the VB term of the MSE loss (RESCALED_MSE).
    :param diffusion_steps: number of steps of the base process.
    """
    gd._check_num_steps(diffusion_steps, "diffusion_steps")
    if noise_schedule not in gd.NAMED_BETA_SCHEDULES:
        raise ValueError(
            f"noise_schedule: unknown beta schedule {noise_schedule!r}; "
            f"expected one of {', '.join(map(repr, gd.NAMED_BETA_SCHEDULES))}"
        )
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)

    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE

    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    try:
        use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    except ValueError as err:
        raise ValueError(f"timestep_respacing={timestep_respacing!r} is invalid: {err}") from None
    if not use_timesteps:
        raise ValueError(f"timestep_respacing={timestep_respacing!r} keeps no timesteps")

    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE

    return SpacedDiffusion(
        use_timesteps=use_timesteps,
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )
