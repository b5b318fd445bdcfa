# DPM-Solver++ (2M, multistep, data prediction) for DiT's discrete-time diffusion.
#
# Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
# (arXiv:2211.01095), algorithm 2 (multistep, second order), in the form used by diffusers'
# DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_type="midpoint",
# final_sigmas_type="zero"). Written for dit_fast; no code is taken from either project.
#
# The model is the usual DiT epsilon model; with learned sigma (2C output channels) only the first C
# channels (eps) are used, the variance channels are ignored. Classifier-free guidance works as with
# p_sample_loop: pass `model.forward_with_cfg` and `model_kwargs=dict(y=..., cfg_scale=...)`.
#
# Every step is one model evaluation followed by a linear update
#     x0     = (x - sigma_s * eps) / alpha_s           (optionally clipped to [-1, 1])
#     x_next = a * x + b * x0 + c * x0_prev
# with per-step scalars (alpha_s, sigma_s, a, b, c) precomputed in float64 on the host.
# `dpm_solver_pp_update` is that update in plain PyTorch (the reference); the solver runs it through
# the fused sampler-step kernel (dit_fast.ops.sampler_step, DDIM mode), whose update
#     x0 = c0 x - c1 eps;  x_next = c2 x0 + c3 (c0 x - x0) / c1 + c6 noise
# equals it exactly (clipping included) with c0 = 1/alpha_s, c1 = sigma_s/alpha_s,
# c2 = b + a alpha_s, c3 = a sigma_s, c6 = c and noise = x0_prev (see `fused_coefficients`).

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops.sampler_step import MODE_DDIM, ddim_coefs, sampler_step
from .gaussian_diffusion import NAMED_BETA_SCHEDULES, _check_num_steps, get_named_beta_schedule, loop_start

__all__ = ["DPMSolverPlusPlus", "create_dpm_solver", "dpm_solver_pp_update", "SKIP_TYPES"]

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


def dpm_solver_pp_update(
    x: torch.Tensor,
    eps: torch.Tensor,
    x0_prev: torch.Tensor,
    coefs: torch.Tensor,
    clip_denoised: bool = False,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ update from the model's eps (the PyTorch reference of the fused step).

    :param coefs: tensor (..., 6) of (alpha_s, sigma_s, a, b, c, d), broadcastable against x
        after the last dim is split off (a (6,) row, or (N, 6) reshaped by the caller); d is the
        noise coefficient of the SDE variant (0 for the ODE solver, where `noise` may be None).
    :return: (x_next, x0) where x0 is this step's data prediction (the next step's `x0_prev`).
    """
    alpha_s, sigma_s, a, b, c, d = coefs.unbind(-1)
    x0 = (x - sigma_s * eps) / alpha_s
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    x_next = a * x + b * x0 + c * x0_prev
    if noise is not None:
        x_next = x_next + d * noise
    return x_next, x0


class DPMSolverPlusPlus:
    """DPM-Solver++(2M) on a discrete-time (DDPM) noise schedule.

    :param betas: the base process's betas (e.g. the 1000-step linear schedule DiT is trained with).
    :param num_steps: number of model evaluations.
    :param order: 1 (DPM-Solver++(1), equivalent to DDIM with eta=0 on the same grid) or 2 (2M).
    :param sde: the stochastic variant (SDE-DPM-Solver++(2M), diffusers' "sde-dpmsolver++"): each
        step adds fresh Gaussian noise, which corrects the model's errors along the way as ancestral
        DDPM sampling does; deterministic (ODE) when False.
    :param skip_type: time grid: "time_uniform" (evenly spaced timesteps from T-1, diffusers'
        "linspace" spacing), "logSNR" (even in log-SNR) or "time_quadratic".
    The first step (no history yet) and the final step, to zero noise, are first order (as in
    diffusers with final_sigmas_type="zero").

    The model is evaluated at integer timesteps of the base process (`self.timesteps`, from T-1
    down); the last update jumps to zero noise, i.e. returns the data prediction of the last
    evaluation combined with the multistep correction.
    """

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray,
        num_steps: int,
        order: int = 2,
        skip_type: str = "time_uniform",
        sde: bool = False,
    ) -> None:
        _check_num_steps(num_steps, "num_steps")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas < 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        T = betas.shape[0]
        if num_steps > T:
            raise ValueError(f"num_steps ({num_steps}) cannot exceed the {T} steps of the base process")
        self.betas = betas
        self.num_train_timesteps = T
        self.num_steps = int(num_steps)
        self.order = order
        self.skip_type = skip_type
        self.sde = bool(sde)
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.timesteps = self._time_grid()                       # (num_steps,) int64, decreasing
        self.coefs = self._coefficients()                        # (num_steps, 6) float64
        self._tables: Dict[Tuple[torch.device, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ schedule

    def _lambda(self, t: np.ndarray) -> np.ndarray:
        ab = self.alphas_cumprod[t]
        return 0.5 * (np.log(ab) - np.log1p(-ab))

    def _time_grid(self) -> np.ndarray:
        T, N = self.num_train_timesteps, self.num_steps
        if self.skip_type == "time_uniform":
            grid = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
        elif self.skip_type == "time_quadratic":
            grid = (np.linspace(0, math.sqrt(T - 1), N + 1) ** 2).round()[::-1][:-1]
        else:  # logSNR: even in lambda between t = T-1 and t = 0, mapped to the nearest timestep
            lam = self._lambda(np.arange(T))                  # decreasing in t
            targets = np.linspace(lam[T - 1], lam[0], N + 1)[:-1]
            grid = np.interp(targets, lam[::-1], np.arange(T)[::-1]).round()
        grid = grid.astype(np.int64)
        # rounding can repeat timesteps where the grid is denser than the integers (logSNR near t = 0):
        # push them apart, keeping the grid strictly decreasing
        for i in range(N - 2, -1, -1):
            grid[i] = max(grid[i], grid[i + 1] + 1)
        if grid[0] > T - 1:
            raise ValueError(f"num_steps={N} is too many for skip_type={self.skip_type!r} on a {T}-step schedule")
        return grid

    def _coefficients(self) -> np.ndarray:
        ab = self.alphas_cumprod[self.timesteps]
        alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
        lam = np.log(alpha) - np.log(sigma)
        N = self.num_steps
        out = np.zeros((N, 6), dtype=np.float64)
        for i in range(N):
            final = i == N - 1
            out[i, 0], out[i, 1] = alpha[i], sigma[i]
            if final:                                   # to zero noise: x_next = x0
                out[i, 2:] = (0.0, 1.0, 0.0, 0.0)
                continue
            h = lam[i + 1] - lam[i]
            if self.sde:                                # x_next = a x + phi alpha_t D + sigma_t sqrt(phi) z
                phi = -np.expm1(-2.0 * h)               # 1 - e^{-2h}
                a = sigma[i + 1] / sigma[i] * np.exp(-h)
                d = sigma[i + 1] * np.sqrt(phi)
            else:                                       # x_next = a x + phi alpha_t D
                phi = -np.expm1(-h)                     # 1 - e^{-h}
                a = sigma[i + 1] / sigma[i]
                d = 0.0
            if self.order == 1 or i == 0:
                out[i, 2:] = (a, alpha[i + 1] * phi, 0.0, d)
            else:                                       # D = x0 + (x0 - x0_prev) / (2 r0): midpoint
                r0 = (lam[i] - lam[i - 1]) / h
                out[i, 2:] = (a, alpha[i + 1] * phi * (1 + 0.5 / r0), -alpha[i + 1] * phi * 0.5 / r0, d)
        return out

    def fused_coefficients(self) -> np.ndarray:
        """(num_steps, 8) float64: the per-step coefficients of the fused sampler step (DDIM mode,
        x0_prev in the noise slot) that reproduce `dpm_solver_pp_update` (see the module comment).
        The SDE variant puts c x0_prev + d z in the noise slot, with coefficient 1."""
        alpha, sigma, a, b, c = (self.coefs[:, k] for k in range(5))
        slot = np.ones_like(c) if self.sde else c
        return ddim_coefs(torch.from_numpy(1.0 / alpha), torch.from_numpy(sigma / alpha),
                          torch.from_numpy(b + a * alpha), torch.from_numpy(a * sigma),
                          torch.from_numpy(slot), dtype=torch.float64).numpy()

    def _table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (torch.device(device), name, dtype)
        table = self._tables.get(key)
        if table is None:
            if name == "fused":
                table = torch.from_numpy(self.fused_coefficients()).to(device=device, dtype=dtype)
            elif name == "sde":  # (c, d): the noise slot of the SDE variant is c x0_prev + d z
                table = torch.from_numpy(self.coefs[:, 4:6].copy()).to(device=device, dtype=dtype)
            else:
                table = torch.from_numpy(self.timesteps).to(device)
            self._tables[key] = table
        return table

    # ------------------------------------------------------------------ stepping

    def init_state(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Solver state carried between steps: the previous data prediction."""
        return {"x0_prev": torch.zeros_like(x)}

    def step_indices(self) -> List[int]:
        """The values of the step index passed to `step`, in order."""
        return list(range(self.num_steps))

    def step(
        self,
        model: Callable[..., Any],
        x: torch.Tensor,
        i: torch.Tensor,
        state: Dict[str, torch.Tensor],
        model_kwargs: Optional[Dict[str, Any]] = None,
        clip_denoised: bool = False,
        noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """Step `i` (an int64 tensor of shape (N,) holding the step index for every sample).

        Pure tensor code without host synchronization, so it can be compiled and CUDA-graph captured.
        `noise` (like x) is used by the SDE variant only (drawn with randn_like when None).
        :return: (x_next, new state, x0 prediction).
        """
        t = self._table("timesteps", x.device)[i]                                  # (N,)
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        coefs = self._table("fused", x.device, table_dtype)[i]                      # (N, 8)
        model_output = model(x, t, **(model_kwargs or {}))
        if isinstance(model_output, tuple):
            model_output = model_output[0]
        C = x.shape[1]
        if model_output.shape[1] not in (C, 2 * C) or model_output.shape[2:] != x.shape[2:] \
                or model_output.shape[0] != x.shape[0]:
            raise ValueError(f"model output must have shape {tuple(x.shape)} (eps) or {(x.shape[0], 2 * C, *x.shape[2:])} "
                             f"(eps and learned variance), got {tuple(model_output.shape)}")
        # One fused pass: x0 from eps, then a*x + b*x0 + c*x0_prev (x0_prev rides in the noise slot;
        # the SDE variant puts c*x0_prev + d*z there).
        slot = state["x0_prev"]
        if self.sde:
            if noise is None:
                noise = torch.randn_like(x)
            cd = self._table("sde", x.device, table_dtype)[i].view(-1, 2, *([1] * (x.ndim - 1)))
            slot = cd[:, 0] * slot + cd[:, 1] * noise.to(slot.dtype)
        x_next, x0 = sampler_step(model_output, x, slot, coefs, mode=MODE_DDIM, clip_denoised=clip_denoised)
        x_next, x0 = x_next.to(x.dtype), x0.to(x.dtype)
        return x_next, {"x0_prev": x0}, x0

    # ------------------------------------------------------------------ loops (p_sample_loop-like API)

    def sample_loop_progressive(
        self,
        model: Callable[..., Any],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield {'sample', 'pred_xstart'} after each step."""
        x, indices, _ = loop_start(model, shape, noise, device, self.step_indices(), progress)
        state = self.init_state(x)
        for i in indices:
            it = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x, state, x0 = self.step(model, x, it, state, model_kwargs, clip_denoised,
                                         torch.randn_like(x) if self.sde else None)
            yield {"sample": x, "pred_xstart": x0}

    def sample_loop(
        self,
        model: Callable[..., Any],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate samples in `num_steps` model evaluations. Same usage as p_sample_loop()."""
        final = None
        for final in self.sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                  model_kwargs=model_kwargs, device=device, progress=progress):
            pass
        return final["sample"]

    def __repr__(self) -> str:
        return (f"DPMSolverPlusPlus(num_steps={self.num_steps}, order={self.order}, skip_type={self.skip_type!r}, "
                f"sde={self.sde}, "
                f"num_train_timesteps={self.num_train_timesteps})")


def create_dpm_solver(
    num_steps: int,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    order: int = 2,
    skip_type: str = "time_uniform",
    sde: bool = False,
) -> DPMSolverPlusPlus:
    """DPM-Solver++ on the schedule `create_diffusion` builds (same `noise_schedule`, `diffusion_steps`)."""
    _check_num_steps(diffusion_steps, "diffusion_steps")
    if noise_schedule not in NAMED_BETA_SCHEDULES:
        raise ValueError(f"noise_schedule: unknown beta schedule {noise_schedule!r}; expected one of "
                         f"{', '.join(map(repr, NAMED_BETA_SCHEDULES))}")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    return DPMSolverPlusPlus(betas, num_steps, order=order, skip_type=skip_type, sde=sde)
