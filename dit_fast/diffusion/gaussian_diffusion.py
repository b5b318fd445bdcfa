# Gaussian diffusion: noise schedules, the forward process q, the learned reverse process p,
# DDPM / DDIM samplers, training losses and the variational bound.
#
# The math follows facebookresearch/DiT `diffusion/gaussian_diffusion.py`, which was adapted from
# OpenAI's diffusion code (MIT license):
#     GLIDE: https://github.com/openai/glide-text2im/blob/main/glide_text2im/gaussian_diffusion.py
#     ADM:   https://github.com/openai/guided-diffusion/blob/main/guided_diffusion
#     IDDPM: https://github.com/openai/improved-diffusion/blob/main/improved_diffusion/gaussian_diffusion.py
# and originally from Ho et al.'s TF diffusion code. Re-implemented for dit_fast with the same
# public names, arguments and numerics (float64 numpy schedules, float32 coefficients).
#
# Layout for kernels: the per-step arithmetic that follows the model call lives in small
# pure-tensor methods (`_p_sample_step`, `_ddim_step`, `_ddim_reverse_step`, ...). The samplers call
# them. `_p_sample_step` and `_ddim_step` run the fused sampler-step op (dit_fast.ops.sampler_step:
# one kernel for x_0 prediction, clipping, posterior mean, learned-range variance and noise) when it
# applies (epsilon prediction, no denoised_fn, learned-range or fixed variance), and the unfused
# PyTorch code otherwise; both give the same float32 results (see tests/test_sampler_step.py).

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "get_beta_schedule",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "mean_flat",
]

Model = Callable[..., Any]
DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]

NAMED_BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
_LN2 = math.log(2.0)


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise epsilon


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained.

    LEARNED_RANGE: the model outputs v in [-1, 1] interpolating (in log space) between the
    posterior variance (FIXED_SMALL) and beta_t (FIXED_LARGE).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the KL term when the variance is learned)
    RESCALED_MSE = enum.auto()  # raw MSE (plus a rescaled KL term when the variance is learned)
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # like KL, rescaled to estimate the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------------
# Beta schedules
# ----------------------------------------------------------------------------------------------


def _warmup_beta(beta_start: float, beta_end: float, num_diffusion_timesteps: int, warmup_frac: float) -> np.ndarray:
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int) -> np.ndarray:
    """Deprecated schedule API kept for compatibility; prefer `get_named_beta_schedule`."""
    n = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, n, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, n, 0.5)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(n, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    else:
        raise ValueError(
            f"beta_schedule: unknown schedule {beta_schedule!r}; expected one of "
            "'quad', 'linear', 'warmup10', 'warmup50', 'const', 'jsd'"
        )
    assert betas.shape == (n,)
    return betas


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Named beta schedule ("linear" or "squaredcos_cap_v2"), float64, length `num_diffusion_timesteps`."""
    _check_num_steps(num_diffusion_timesteps, "num_diffusion_timesteps")
    if schedule_name == "linear":
        # Ho et al.'s linear schedule, rescaled so that any number of steps behaves similarly.
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"noise_schedule: unknown beta schedule {schedule_name!r}; "
        f"expected one of {', '.join(map(repr, NAMED_BETA_SCHEDULES))}"
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas discretizing a continuous alpha_bar(t), t in [0, 1]; capped at `max_beta`."""
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float64)


def _check_num_steps(n: Any, name: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


# ----------------------------------------------------------------------------------------------
# Coefficient lookup
# ----------------------------------------------------------------------------------------------


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
    """Gather `arr[timesteps]` as float32 and broadcast to `broadcast_shape` (batch dim first)."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    res = res.view(-1, *([1] * (len(broadcast_shape) - 1)))
    return res + torch.zeros(broadcast_shape, device=timesteps.device)


class GaussianDiffusion:
    """Training and sampling utilities for a Gaussian diffusion process.

    :param betas: 1-D array of betas, one per diffusion step (t = 0 is the first, least noisy step).
    :param model_mean_type: a `ModelMeanType`.
    :param model_var_type: a `ModelVarType`.
    :param loss_type: a `LossType`.

    Schedules are kept as float64 numpy arrays (public attributes, as in the official code);
    per-step coefficients are gathered as float32 tensors, cached per device.
    """

    def __init__(
        self,
        *,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ) -> None:
        if not isinstance(model_mean_type, ModelMeanType):
            raise ValueError(f"model_mean_type must be a ModelMeanType, got {model_mean_type!r}")
        if not isinstance(model_var_type, ModelVarType):
            raise ValueError(f"model_var_type must be a ModelVarType, got {model_var_type!r}")
        if not isinstance(loss_type, LossType):
            raise ValueError(f"loss_type must be a LossType, got {loss_type!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        # float64 for accuracy, as in the official code
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log clipped: the posterior variance is 0 at t = 0, so reuse the t = 1 value there
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # reverse-process variance helpers
        self.log_betas = np.log(betas)
        if self.num_timesteps > 1:
            # FIXED_LARGE: beta_t, with the t = 0 entry replaced for a better decoder likelihood
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        else:
            self.fixed_large_variance = self.fixed_large_log_variance = np.array([])

        self._coef_cache: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        # (kind, device, eta) -> (num_timesteps, 8) float32 coefficient rows of the fused step
        self._fused_cache: Dict[Tuple[str, torch.device, float], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers

    def _coef_table(self, name: str, device: torch.device) -> torch.Tensor:
        """float32 schedule table `self.<name>` on `device` (cached)."""
        key = (name, device)
        table = self._coef_cache.get(key)
        if table is None:
            arr = getattr(self, name)
            if arr.shape[0] != self.num_timesteps:
                raise ValueError(f"schedule {name!r} is undefined for a {self.num_timesteps}-step diffusion")
            table = torch.from_numpy(np.ascontiguousarray(arr)).float().to(device)
            self._coef_cache[key] = table
        return table

    def _coef(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """float32 schedule values `self.<name>[t]`, shaped [N, 1, ..., 1] with `ndim` dims."""
        return self._coef_table(name, t.device)[t].view(-1, *([1] * (ndim - 1)))

    def _coef_full(self, name: str, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Like `_coef`, materialized to the full `shape` (as `_extract_into_tensor` returns)."""
        return self._coef(name, t, len(shape)).expand(*shape).contiguous()

    def _check_t(self, t: Any, batch: int, name: str = "t") -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a 1-D integer tensor of timesteps, got {type(t).__name__}")
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer timesteps, got dtype {t.dtype}")
        if batch == 0 or torch.compiler.is_compiling():
            return
        T = self.num_timesteps
        if t.device.type == "cpu":
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= T:
                raise ValueError(f"{name} must hold timesteps in [0, {T - 1}] (this diffusion has {T} steps), "
                                 f"got values in [{lo}, {hi}]")
        else:  # no host sync per call (the training loop's t lives here): a device-side assertion
            torch._assert_async(((t >= 0) & (t < T)).all(), f"{name} must hold timesteps in [0, {T - 1}]")

    def _check_ancestral(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError(f"ancestral (DDPM) sampling needs a diffusion of at least 2 steps (the posterior "
                             f"variance is undefined for {self.num_timesteps}); use DDIM for a single step")

    @staticmethod
    def _check_cfg_scale(cfg_scale: Any) -> None:
        if isinstance(cfg_scale, (int, float)) and not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")

    @staticmethod
    def _check_same_shape(a: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
        if a.shape != ref.shape:
            raise ValueError(f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(a.shape)}")

    def _wrap_model(self, model: Model) -> Model:
        """Hook for timestep remapping (see SpacedDiffusion); identity here."""
        return model

    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def _check_output_shape(self, model_output: torch.Tensor, x: torch.Tensor) -> bool:
        """Raises ValueError unless the raw model output fits x; True for learned variance."""
        B, C = x.shape[:2]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, C * 2, *x.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(
                    f"model output must have shape {expected} (mean and variance channels) for a "
                    f"learned-variance diffusion, got {tuple(model_output.shape)}"
                )
            return True
        if tuple(model_output.shape) != tuple(x.shape):
            raise ValueError(f"model output must have shape {tuple(x.shape)}, got {tuple(model_output.shape)}")
        return False

    def _split_output(self, model_output: Any, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """Split raw model output into (mean-part, variance-part or None, extra)."""
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        if self._check_output_shape(model_output, x):
            mean_part, var_values = torch.split(model_output, x.shape[1], dim=1)
            return mean_part, var_values, extra
        return model_output, None, extra

    # ------------------------------------------------------------------ forward process q

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like `x_start`."""
        self._check_t(t, x_start.shape[0])
        shape = x_start.shape
        mean = self._coef("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, shape)
        log_variance = self._coef_full("log_one_minus_alphas_cumprod", t, shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) (t = 0 means one step of noise)."""
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = torch.randn_like(x_start)
        self._check_same_shape(noise, x_start, "noise", "x_start")
        n = x_start.ndim
        return self._coef("sqrt_alphas_cumprod", t, n) * x_start + self._coef("sqrt_one_minus_alphas_cumprod", t, n) * noise

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        self._check_same_shape(x_start, x_t, "x_start", "x_t")
        self._check_t(t, x_t.shape[0])
        shape = x_t.shape
        posterior_mean = self._posterior_mean(x_start, x_t, t)
        posterior_variance = self._coef_full("posterior_variance", t, shape)
        posterior_log_variance_clipped = self._coef_full("posterior_log_variance_clipped", t, shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def _posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return self._coef("posterior_mean_coef1", t, n) * x_start + self._coef("posterior_mean_coef2", t, n) * x_t

    # ------------------------------------------------------------------ reverse process p

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        self._check_same_shape(eps, x_t, "eps", "x_t")
        n = x_t.ndim
        return self._coef("sqrt_recip_alphas_cumprod", t, n) * x_t - self._coef("sqrt_recipm1_alphas_cumprod", t, n) * eps

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (self._coef("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, n
        )

    def _model_variance(
        self, var_values: Optional[torch.Tensor], x: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(variance, log_variance) of p(x_{t-1} | x_t), both shaped like `x`."""
        n = x.ndim
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            # var_values in [-1, 1] spans [posterior variance, beta_t] in log space. As in the
            # official DiT code, LEARNED is handled like LEARNED_RANGE (create_diffusion never uses it).
            min_log = self._coef("posterior_log_variance_clipped", t, n)
            max_log = self._coef("log_betas", t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        if self.model_var_type == ModelVarType.FIXED_SMALL:
            return (self._coef_full("posterior_variance", t, x.shape),
                    self._coef_full("posterior_log_variance_clipped", t, x.shape))
        return self._coef_full("fixed_large_variance", t, x.shape), self._coef_full("fixed_large_log_variance", t, x.shape)

    def _pred_xstart(
        self,
        mean_part: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: DenoisedFn,
    ) -> torch.Tensor:
        """x_0 prediction from the model's mean output (then denoised_fn, then optional clip to [-1, 1])."""
        if self.model_mean_type == ModelMeanType.START_X:
            pred = mean_part
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred = self._predict_xstart_from_eps(x, t, mean_part)
        else:
            raise NotImplementedError(f"model_mean_type {self.model_mean_type} is not supported for sampling")
        if denoised_fn is not None:
            pred = denoised_fn(pred)
        if clip_denoised:
            pred = pred.clamp(-1, 1)
        return pred

    def _mean_variance_from_output(
        self,
        model_output: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
    ) -> Dict[str, Any]:
        """p_mean_variance arithmetic given the raw model output (no model call)."""
        mean_part, var_values, extra = self._split_output(model_output, x)
        variance, log_variance = self._model_variance(var_values, x, t)
        pred_xstart = self._pred_xstart(mean_part, x, t, clip_denoised, denoised_fn)
        mean = self._posterior_mean(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "extra": extra}

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: callable `model(x, t, **model_kwargs)`.
        :param x: [N x C x ...] tensor at time t.
        :param t: 1-D tensor of timesteps.
        :param clip_denoised: clip the x_0 prediction to [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction (before clipping).
        :param model_kwargs: extra keyword arguments for the model (e.g. class labels `y`).
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart' and 'extra'.
        """
        self._check_t(t, x.shape[0])
        model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        return self._mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def condition_mean(self, cond_fn: Model, p_mean_var: Dict[str, Any], x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> torch.Tensor:
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015)."""
        gradient = self._wrap_model(cond_fn)(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn: Model, p_mean_var: Dict[str, Any], x: torch.Tensor, t: torch.Tensor, model_kwargs=None) -> Dict[str, Any]:
        """p_mean_variance output with the score conditioned by cond_fn (Song et al. 2020)."""
        alpha_bar = self._coef("alphas_cumprod", t, x.ndim)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * self._wrap_model(cond_fn)(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"] = self._posterior_mean(out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------------ per-step sampler arithmetic
    # Pure tensor functions of (model output, x_t, t, noise): the fusion points for kernels.

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
        """1.0 where t != 0 (no noise is added on the final step), shaped [N, 1, ..., 1]."""
        return (t != 0).float().view(-1, *([1] * (ndim - 1)))

    def _add_noise(self, mean: torch.Tensor, log_variance: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_{t-1} = mean + [t != 0] * exp(log_variance / 2) * noise."""
        return mean + self._nonzero_mask(t, mean.ndim) * torch.exp(0.5 * log_variance) * noise

    # -- the fused sampler step (dit_fast.ops.sampler_step) --

    def _fused_table(self, kind: str, device: torch.device, eta: float = 0.0) -> torch.Tensor:
        """(num_timesteps, 8) float32 per-timestep coefficient rows of the fused step, computed
        from the float32 tables with exactly the float32 operations of the unfused code (so a
        gathered row equals what `_p_sample_step` / `_ddim_update` compute per sample)."""
        key = (kind, device, float(eta))
        table = self._fused_cache.get(key)
        if table is not None:
            return table
        tab = lambda name: self._coef_table(name, device)  # noqa: E731
        zeros = torch.zeros(self.num_timesteps, device=device)
        mask = (torch.arange(self.num_timesteps, device=device) != 0).float()
        if kind == "ddpm":
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                min_log, max_log = tab("posterior_log_variance_clipped"), tab("log_betas")
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                min_log, max_log = tab("posterior_log_variance_clipped"), zeros
            else:
                min_log, max_log = tab("fixed_large_log_variance"), zeros
            cols = [tab("sqrt_recip_alphas_cumprod"), tab("sqrt_recipm1_alphas_cumprod"),
                    tab("posterior_mean_coef1"), tab("posterior_mean_coef2"), min_log, max_log, mask]
        else:  # ddim: as _ddim_update
            alpha_bar, alpha_bar_prev = tab("alphas_cumprod"), tab("alphas_cumprod_prev")
            sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            cols = [tab("sqrt_recip_alphas_cumprod"), tab("sqrt_recipm1_alphas_cumprod"),
                    torch.sqrt(alpha_bar_prev), torch.sqrt(1 - alpha_bar_prev - sigma**2), zeros, zeros,
                    mask * sigma]
        table = torch.stack(cols + [zeros], dim=1).contiguous()
        self._fused_cache[key] = table
        return table

    def _fused_step_applies(self, model_output: Any, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor],
                            denoised_fn: DenoisedFn, ddim: bool) -> bool:
        """Whether the fused op reproduces the unfused step for these arguments."""
        if denoised_fn is not None or self.model_mean_type != ModelMeanType.EPSILON:
            return False
        if not ddim and self.num_timesteps < 2:  # the posterior tables are undefined
            return False
        mo = model_output[0] if isinstance(model_output, tuple) else model_output
        if not isinstance(mo, torch.Tensor) or not isinstance(t, torch.Tensor) or x.dim() < 2:
            return False
        if noise is not None and (noise.shape != x.shape or noise.dtype != x.dtype or noise.device != x.device):
            return False
        # float64 data: the unfused code mixes float32 coefficients with float64 tensors; the fused
        # op reproduces that only when model output and x are both float64.
        if (mo.dtype == torch.float64) != (x.dtype == torch.float64):
            return False
        # ... and a fixed variance's float32 exp(0.5 * log_variance) is float32 even for float64 data.
        fixed_var = self.model_var_type in (ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE)
        if not ddim and fixed_var and x.dtype == torch.float64:
            return False
        return mo.device == x.device == t.device

    def _fused_coefs(self, kind: str, t: torch.Tensor, x: torch.Tensor, eta: float = 0.0) -> torch.Tensor:
        rows = self._fused_table(kind, x.device, eta)[t]
        return rows.double() if x.dtype == torch.float64 else rows

    def _p_sample_step(
        self,
        model_output: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
    ) -> Dict[str, torch.Tensor]:
        """One ancestral (DDPM) update from the raw model output:
        x_0 prediction -> posterior mean, model (learned-range) variance -> x_{t-1}."""
        self._check_ancestral()
        if self._fused_step_applies(model_output, x, t, noise, denoised_fn, ddim=False):
            from ..ops import sampler_step as ss

            mo = model_output[0] if isinstance(model_output, tuple) else model_output
            self._check_output_shape(mo, x)  # same errors as the unfused path
            learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
            mode = ss.MODE_DDPM_LEARNED_RANGE if learned else ss.MODE_DDPM_FIXED
            sample, pred = ss._run(mo, x, noise, self._fused_coefs("ddpm", t, x), mode, clip_denoised, None, None)
            return {"sample": sample, "pred_xstart": pred}
        out = self._mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)
        return {"sample": self._add_noise(out["mean"], out["log_variance"], noise, t), "pred_xstart": out["pred_xstart"]}

    @staticmethod
    def _cfg_combine(model_output: torch.Tensor, cfg_scale: float, guide_channels: int) -> torch.Tensor:
        """The conditional half of forward_with_cfg's output, from the doubled-batch output."""
        n = model_output.shape[0] // 2
        cond, uncond = model_output[:n], model_output[n:]
        g = guide_channels
        half_eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([half_eps, cond[:, g:]], dim=1)

    def _resolve_guide_channels(self, guide_channels: Any, x: torch.Tensor) -> int:
        C = x.shape[1]
        if guide_channels == "all":
            return C
        if isinstance(guide_channels, bool) or not isinstance(guide_channels, int) or not 0 < guide_channels <= C:
            raise ValueError(f"guide_channels must be 'all' or an int in [1, {C}], got {guide_channels!r}")
        return guide_channels

    def _check_cfg_output(self, model_output: Any, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(model_output, torch.Tensor) or model_output.dim() < 1 or model_output.shape[0] != 2 * x.shape[0]:
            shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(f"model_output must hold the doubled batch (2N = {2 * x.shape[0]}: conditional half, "
                             f"then unconditional) for classifier-free guidance, got {shape}")
        return model_output

    def p_sample_step_cfg(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        cfg_scale: float,
        guide_channels: Any = 3,
        clip_denoised: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """One DDPM step with classifier-free guidance, from the output of ONE `model.forward` call on
        the doubled batch (``cat([x, x])``, ``cat([t, t])``, labels ``cat([y, null])``): model_output is
        (2N, ...), conditional half first; x, t, noise are the N conditional samples. Equals
        ``forward_with_cfg`` + `p_sample` on the first half (guide_channels: 3 = official, or "all"),
        with the guidance combine fused into the step kernel."""
        self._check_ancestral()
        self._check_cfg_scale(cfg_scale)
        self._check_t(t, x.shape[0])
        self._check_cfg_output(model_output, x)
        g = self._resolve_guide_channels(guide_channels, x)
        if self._fused_step_applies(model_output, x, t, noise, None, ddim=False):
            from ..ops import sampler_step as ss

            self._check_output_shape(model_output[: x.shape[0]], x)
            learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
            sample, pred = ss.ddpm_step(model_output, x, noise, self._fused_coefs("ddpm", t, x), learned_range=learned,
                                        clip_denoised=clip_denoised, cfg_scale=float(cfg_scale), guide_channels=g)
            return {"sample": sample, "pred_xstart": pred}
        return self._p_sample_step(self._cfg_combine(model_output, cfg_scale, g), x, t, noise, clip_denoised)

    def ddim_step_cfg(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        cfg_scale: float,
        guide_channels: Any = 3,
        clip_denoised: bool = True,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """`p_sample_step_cfg` for DDIM."""
        self._check_cfg_scale(cfg_scale)
        self._check_t(t, x.shape[0])
        self._check_cfg_output(model_output, x)
        g = self._resolve_guide_channels(guide_channels, x)
        if isinstance(eta, (int, float)) and self._fused_step_applies(model_output, x, t, noise, None, ddim=True):
            from ..ops import sampler_step as ss

            self._check_output_shape(model_output[: x.shape[0]], x)
            sample, pred = ss.ddim_step(model_output, x, noise, self._fused_coefs("ddim", t, x, eta),
                                        clip_denoised=clip_denoised, cfg_scale=float(cfg_scale), guide_channels=g)
            return {"sample": sample, "pred_xstart": pred}
        return self._ddim_step(self._cfg_combine(model_output, cfg_scale, g), x, t, noise, eta, clip_denoised)

    def _ddim_update(
        self, x: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor, noise: torch.Tensor, eta: float
    ) -> torch.Tensor:
        """DDIM x_{t-1} from x_t and the x_0 prediction (Song et al., eq. 12)."""
        n = x.ndim
        # the model usually predicts eps, but re-derive it in case x_0 was clipped or predicted
        eps = self._predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._coef("alphas_cumprod", t, n)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, n)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        return mean_pred + self._nonzero_mask(t, n) * sigma * noise

    def _ddim_step(
        self,
        model_output: Any,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM update from the raw model output (the variance channels are ignored)."""
        if isinstance(eta, (int, float)) and self._fused_step_applies(model_output, x, t, noise, denoised_fn, ddim=True):
            from ..ops import sampler_step as ss

            mo = model_output[0] if isinstance(model_output, tuple) else model_output
            self._check_output_shape(mo, x)  # same errors as the unfused path
            sample, pred = ss._run(mo, x, noise, self._fused_coefs("ddim", t, x, eta), ss.MODE_DDIM, clip_denoised,
                                   None, None)
            return {"sample": sample, "pred_xstart": pred}
        mean_part, _, _ = self._split_output(model_output, x)
        pred_xstart = self._pred_xstart(mean_part, x, t, clip_denoised, denoised_fn)
        return {"sample": self._ddim_update(x, t, pred_xstart, noise, eta), "pred_xstart": pred_xstart}

    def _ddim_reverse_update(self, x: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step x_t -> x_{t+1} (eq. 12 reversed)."""
        n = x.ndim
        eps = (self._coef("sqrt_recip_alphas_cumprod", t, n) * x - pred_xstart) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, n
        )
        alpha_bar_next = self._coef("alphas_cumprod_next", t, n)
        return pred_xstart * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps

    # ------------------------------------------------------------------ samplers

    def _uses_stock_p_mean_variance(self) -> bool:
        # The single-call fast paths below are only valid if no subclass customises p_mean_variance.
        return type(self).p_mean_variance is GaussianDiffusion.p_mean_variance

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Sample x_{t-1} ~ p(x_{t-1} | x_t). Returns {'sample', 'pred_xstart'}."""
        self._check_ancestral()
        if cond_fn is None and self._uses_stock_p_mean_variance():
            self._check_t(t, x.shape[0])
            model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
            noise = torch.randn_like(x)
            return self._p_sample_step(model_output, x, t, noise, clip_denoised, denoised_fn)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return {"sample": self._add_noise(out["mean"], out["log_variance"], noise, t), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """Sample x_{t-1} with DDIM. Same usage as p_sample()."""
        if cond_fn is None and self._uses_stock_p_mean_variance():
            self._check_t(t, x.shape[0])
            model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
            noise = torch.randn_like(x)
            return self._ddim_step(model_output, x, t, noise, eta, clip_denoised, denoised_fn)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        return {"sample": self._ddim_update(x, t, out["pred_xstart"], noise, eta), "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """Deterministic DDIM inversion step x_t -> x_{t+1} (requires eta == 0)."""
        if eta != 0.0:
            raise ValueError(f"eta must be 0.0 for ddim_reverse_sample (the reverse ODE is deterministic), got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return {"sample": self._ddim_reverse_update(x, t, out["pred_xstart"]), "pred_xstart": out["pred_xstart"]}

    def _loop_setup(
        self, model: Model, shape: Sequence[int], noise: Optional[torch.Tensor], device: Any, progress: bool
    ) -> Tuple[torch.Tensor, Any, torch.device]:
        return loop_start(model, shape, noise, device, list(range(self.num_timesteps))[::-1], progress)

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate samples with ancestral sampling.

        :param shape: sample shape (N, C, H, W).
        :param noise: optional starting noise x_T of that shape.
        :param device: device for the samples (default: the noise's, else the model's parameters').
        :param progress: show a tqdm progress bar.
        :return: the final (non-differentiable) batch of samples.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like p_sample_loop(), but yield each step's p_sample() output."""
        self._check_ancestral()  # now, not at the first step
        return self._progressive(
            lambda img, t: self.p_sample(model, img, t, clip_denoised=clip_denoised,
                                         denoised_fn=denoised_fn, cond_fn=cond_fn,
                                         model_kwargs=model_kwargs),
            model, shape, noise, device, progress)

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Generate samples with DDIM. Same usage as p_sample_loop()."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: DenoisedFn = None,
        cond_fn: Optional[Model] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like ddim_sample_loop(), but yield each step's ddim_sample() output."""
        return self._progressive(
            lambda img, t: self.ddim_sample(model, img, t, clip_denoised=clip_denoised,
                                            denoised_fn=denoised_fn, cond_fn=cond_fn,
                                            model_kwargs=model_kwargs, eta=eta),
            model, shape, noise, device, progress)

    def _progressive(self, step, model, shape, noise, device, progress):
        """The sampling loop: x_T, then `step(img, t)` (a p_sample / ddim_sample output dict) for
        t = T-1 .. 0, yielding each output."""
        img, indices, device = self._loop_setup(model, shape, noise, device, progress)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(img, t)
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ losses and the bound

    def _vb_terms_from_output(
        self, model_output: Any, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> Dict[str, torch.Tensor]:
        """Variational-bound term (bits) for each sample, given the raw model output."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self._mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        # t == 0: decoder NLL; otherwise KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """One term of the variational lower bound, in bits.

        :return: {'output': [N] NLLs (t == 0) or KLs, 'pred_xstart': x_0 predictions}.
        """
        self._check_t(t, x_t.shape[0])
        model_output = self._wrap_model(model)(x_t, t, **(model_kwargs or {}))
        return self._vb_terms_from_output(model_output, x_start, x_t, t, clip_denoised)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Training losses for one timestep per sample.

        :param model: callable `model(x_t, t, **model_kwargs)`.
        :param x_start: [N x C x ...] clean inputs.
        :param t: [N] timestep indices.
        :param noise: optional Gaussian noise to use for x_t.
        :return: dict with 'loss' ([N]); MSE losses also give 'mse' and, with learned variance, 'vb'.
        """
        self._check_t(t, x_start.shape[0])
        model_kwargs = model_kwargs or {}
        if noise is None:
            noise = torch.randn_like(x_start)
        self._check_same_shape(noise, x_start, "noise", "x_start")
        x_t = self.q_sample(x_start, t, noise=noise)
        model = self._wrap_model(model)

        terms: Dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, t, **model_kwargs)
            mean_part, var_values, _ = self._split_output(model_output, x_t)
            if var_values is not None:
                # Learn the variance with the bound, without letting it move the mean prediction.
                frozen_out = torch.cat([mean_part.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_from_output(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # /1000 for equivalence with the initial implementation
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self._posterior_mean(x_start, x_t, t)
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            terms["mse"] = mean_flat((target - mean_part) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:  # pragma: no cover - all LossType members are handled above
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """Prior KL term KL(q(x_T | x_0) || N(0, I)) in bits, per sample."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LN2

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Full variational lower bound in bits per dim.

        :return: dict with 'total_bpd' [N], 'prior_bpd' [N], and [N x T] tensors 'vb',
                 'xstart_mse' and 'mse' (epsilon MSE), ordered from t = T-1 down to 0.
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in range(self.num_timesteps - 1, -1, -1):
            t_batch = torch.full((batch_size,), step, device=device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t_batch,
                                         clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


def loop_start(model: Model, shape: Sequence[int], noise: Optional[torch.Tensor], device: Any,
               indices: Sequence[int], progress: bool) -> Tuple[torch.Tensor, Any, torch.device]:
    """A sampling loop's start: the initial x (`noise`, checked against `shape`, or fresh noise on
    `device`, by default the noise's or the model's), the step indices (behind a tqdm bar with
    `progress`) and the device."""
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
    if device is None:
        device = noise.device if noise is not None else _infer_device(model)
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
        x = noise
    else:
        x = torch.randn(*shape, device=device)
    if progress:
        from tqdm.auto import tqdm  # lazy: tqdm is only needed for progress bars

        indices = tqdm(indices)
    return x, indices, torch.device(device)


def _infer_device(model: Model) -> torch.device:
    """Device of the model's parameters (also for bound methods such as `model.forward_with_cfg`)."""
    for obj in (model, getattr(model, "__self__", None), getattr(model, "model", None)):
        params = getattr(obj, "parameters", None)
        if callable(params):
            try:
                return next(iter(params())).device
            except StopIteration:
                continue
    raise ValueError("device: cannot infer a device from the model; pass device= or noise=")
