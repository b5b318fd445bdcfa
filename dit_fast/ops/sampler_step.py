"""The diffusion sampler step in one kernel (DDPM ancestral step and DDIM step, epsilon
prediction), optionally with the classifier-free-guidance combine.

From the model output (eps channels, and learned-range variance channels v), x_t, the noise and
per-sample schedule coefficients, one pass computes (see csrc/common/sampler_step.h)::

    eps         = uncond + s * (cond - uncond)  on the first G channels      (guidance, optional)
    pred_xstart = sqrt_recip_alphas_cumprod * x - sqrt_recipm1_alphas_cumprod * eps  [clip to +-1]
    DDPM: mean    = posterior_mean_coef1 * pred_xstart + posterior_mean_coef2 * x
          log_var = frac * log(beta) + (1 - frac) * posterior_log_variance_clipped, frac = (v+1)/2
                    (learned range; a fixed variance uses its log-variance table instead)
          sample  = mean + [t != 0] * exp(0.5 * log_var) * noise
    DDIM: eps'    = (sqrt_recip_alphas_cumprod * x - pred_xstart) / sqrt_recipm1_alphas_cumprod
          sample  = pred_xstart * sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) * eps'
                    + [t != 0] * sigma * noise

operation by operation like the unfused code in dit_fast/diffusion/gaussian_diffusion.py (same
rounding in float32; the reduced-precision guidance / variance arithmetic in the model dtype), so
fused and unfused sampling agree up to the rounding of exp (tests/test_sampler_step.py).

Coefficients: an (N, 8) float32 tensor (float64 for float64 data), one row per sample, built by
`ddpm_coefs` / `ddim_coefs` (or GaussianDiffusion, which caches per-timestep tables).

Guidance (`cfg_scale`): model_output holds the doubled batch [conditional; unconditional]
(2N, ...) from one `model.forward` call on ``cat([x, x])`` with labels ``cat([y, null])``; x and
noise are the N conditional samples. The first `guide_channels` eps channels are guided (3: the
official forward_with_cfg; C: all channels); the other channels and the variance come from the
conditional half, exactly what forward_with_cfg + the official sampler give for the first half.

Not differentiable (sampling runs under no_grad; with grad enabled and inputs requiring grad the
PyTorch reference runs instead).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _backends, nvtx, validation

__all__ = ["ddpm_step", "ddim_step", "ddpm_step_ref", "ddim_step_ref", "sampler_step",
           "sampler_step_ref", "ddpm_coefs", "ddim_coefs", "MODE_DDPM_LEARNED_RANGE",
           "MODE_DDPM_FIXED", "MODE_DDIM", "NUM_COEFS", "OP_NAME"]

OP_NAME = "sampler_step"
MODE_DDPM_LEARNED_RANGE = 0
MODE_DDPM_FIXED = 1
MODE_DDIM = 2
NUM_COEFS = 8



def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation on x built like `like` (N, C, L): DDPM (learned range,
    fixed variance), DDIM, and guided DDPM, with t != 0 and t = 0 samples. Ground truth: the
    reference at the same dtype (the kernel follows it operation by operation, reduced-precision
    guidance arithmetic included), held to x's dtype's tolerance."""
    if like.dim() != 3 or like.shape[1] == 0:  # e.g. select() given an empty probe tensor
        like = like.new_empty(2, 4, 37)
    N, C, L = like.shape if exact else (2, like.shape[1], max(1, min(like.shape[2], 37)))
    x = validation.like_tensor(like, (N, C, L))
    noise = validation.randn((N, C, L), like, seed=1)
    m = validation.randn((2 * N, 2 * C, L), like, seed=2, scale=0.5)
    cd = torch.float64 if like.dtype == torch.float64 else torch.float32
    mask = (torch.arange(N, device=like.device) % 2 == 0).to(cd)  # t = 0 for odd samples
    ddpm = ddpm_coefs(1.3, 0.8, 0.6, 0.4, -5.0, -4.0, mask, dtype=cd)
    ddim = ddim_coefs(1.3, 0.8, 0.9, 0.3, 0.1 * mask, dtype=cd)
    cases = [("ddpm", m[:N].contiguous(), ddpm, MODE_DDPM_LEARNED_RANGE, None),
             ("ddpm fixed", m[:N, :C].contiguous(), ddpm, MODE_DDPM_FIXED, None),
             ("ddim", m[:N, :C].contiguous(), ddim, MODE_DDIM, None),
             ("ddpm guided", m, ddpm, MODE_DDPM_LEARNED_RANGE, 4.0)]  # the kernels' layout
    return validation.run_phases(OP_NAME, backend, [validation.phase(
        name, lambda b, mo, x, n, c, mode=mode, s=s: _KERNELS[b](
            mo, x, n, c, mode, True, s is not None, s or 0.0, 3 if s else C),
        (mo, x, noise, coefs), ("sample", "pred_xstart"), tol_dtype=like.dtype,
        truth=lambda got, a=(mo, x, noise, coefs), mode=mode, s=s: _k_reference(
            *a, mode, True, s is not None, s, 3 if s else C))
        for name, mo, coefs, mode, s in cases], grad, dtype=like.dtype)


# Keyed by x's dtype; model_output's dtype is checked separately (_MODEL_DTYPES).
_backends.register_op(OP_NAME, {
    "reference": None,
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}, validate=_validate, examples=lambda device, dtype: [  # DiT-XL/2's 32x32 latents, an odd size
    torch.empty(2, 4, 1024, device=device, dtype=dtype),
    torch.empty(1, 3, 37, device=device, dtype=dtype)])
_MODEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


# ---- coefficients ---------------------------------------------------------------------------

def _col(v, n: int, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.reshape(-1).to(device=like.device).expand(n) if v.numel() == 1 else v.reshape(-1)
    return torch.full((n,), float(v), device=like.device, dtype=like.dtype)


def _stack(cols, dtype) -> Tensor:
    n = max(c.numel() if isinstance(c, Tensor) else 1 for c in cols)
    like = next((c for c in cols if isinstance(c, Tensor)), torch.empty(0))
    like = torch.empty(0, device=like.device, dtype=dtype)
    cols = [_col(c, n, like).to(dtype) for c in cols]
    out = torch.zeros((n, NUM_COEFS), device=like.device, dtype=dtype)
    for i, c in enumerate(cols):
        if c.shape != (n,):
            raise ValueError(f"coefficient {i} must have shape ({n},) or be a scalar, got {tuple(c.shape)}")
        out[:, i] = c
    return out


def ddpm_coefs(sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
               posterior_mean_coef2, min_log, max_log, nonzero_mask,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, 8) DDPM coefficients from per-sample (N,) tensors or scalars. min_log: the posterior's
    clipped log variance (learned range) or the fixed log variance; max_log: log(beta) (learned
    range; ignored for a fixed variance); nonzero_mask: 1.0 where t != 0."""
    return _stack([sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_mean_coef1,
                   posterior_mean_coef2, min_log, max_log, nonzero_mask], dtype)


def ddim_coefs(sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, sqrt_alphas_cumprod_prev,
               eps_coef, noise_coef, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, 8) DDIM coefficients: eps_coef = sqrt(1 - abar_prev - sigma^2), noise_coef =
    [t != 0] * sigma."""
    return _stack([sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, sqrt_alphas_cumprod_prev,
                   eps_coef, 0.0, 0.0, noise_coef], dtype)


# ---- reference (the unfused PyTorch code, same operations in the same order) ---------------

def sampler_step_ref(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor,
                     mode: int, clip_denoised: bool = True, cfg_scale: Optional[float] = None,
                     guide_channels: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(sample, pred_xstart) with PyTorch ops, exactly as GaussianDiffusion's unfused
    `_p_sample_step` / `_ddim_step` (+ forward_with_cfg's guidance combine)."""
    N, C = x.shape[:2]
    k = coefs.view(N, NUM_COEFS, *([1] * (x.dim() - 1)))
    col = lambda i: k[:, i]  # noqa: E731  (N, 1, ..., 1)
    if cfg_scale is not None:
        G = C if guide_channels is None else guide_channels
        cond, uncond = model_output[:N], model_output[N:]
        eps_g = uncond[:, :G] + cfg_scale * (cond[:, :G] - uncond[:, :G])
        eps = torch.cat([eps_g, cond[:, G:C]], dim=1)
        model_output = cond
    else:
        eps = model_output[:, :C]
    pred = col(0) * x - col(1) * eps
    if clip_denoised:
        pred = pred.clamp(-1, 1)
    if mode == MODE_DDIM:
        eps2 = (col(0) * x - pred) / col(1)
        sample = pred * col(2) + col(3) * eps2
        if noise is not None:
            sample = sample + col(6) * noise
        return sample, pred
    mean = col(2) * pred + col(3) * x
    if noise is None:
        return mean, pred
    if mode == MODE_DDPM_LEARNED_RANGE:
        frac = (model_output[:, C:2 * C] + 1) / 2
        log_var = frac * col(5) + (1 - frac) * col(4)
    else:
        log_var = col(4).expand(x.shape)
    return mean + col(6) * torch.exp(0.5 * log_var) * noise, pred


def ddpm_step_ref(model_output, x, noise, coefs, *, learned_range=True, clip_denoised=True,
                  cfg_scale=None, guide_channels=None):
    mode = MODE_DDPM_LEARNED_RANGE if learned_range else MODE_DDPM_FIXED
    return sampler_step_ref(model_output, x, noise, coefs, mode, clip_denoised, cfg_scale,
                            guide_channels)


def ddim_step_ref(model_output, x, noise, coefs, *, clip_denoised=True, cfg_scale=None,
                  guide_channels=None):
    return sampler_step_ref(model_output, x, noise, coefs, MODE_DDIM, clip_denoised, cfg_scale,
                            guide_channels)


# ---- backend kernels: (m3, x3, noise3, coefs, mode, clip, guided, scale, G) -> (sample, pred) ---

def _k_reference(m, x, noise, coefs, mode, clip, guided, scale, G):
    return sampler_step_ref(m, x, noise, coefs, mode, clip, scale if guided else None, G)


def _k_native(m, x, noise, coefs, mode, clip, guided, scale, G):
    return torch.ops.dit_fast.sampler_step_fwd(m, x, noise, coefs, mode, clip, guided, scale, G)


def _k_triton(m, x, noise, coefs, mode, clip, guided, scale, G):
    from ..kernels.triton import sampler_step as K
    return K.sampler_step(m, x, noise, coefs, mode, clip, guided, scale, G)


_KERNELS: Dict[str, Callable] = {"reference": _k_reference, "cpu": _k_native,
                                 "triton": _k_triton, "cuda": _k_native}


@torch.library.custom_op("dit_fast::sampler_step", mutates_args=())
def _sampler_step_op(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor,
                     mode: int, clip: bool, guided: bool, cfg_scale: float,
                     guide_channels: int) -> tuple[Tensor, Tensor]:
    backend = _pick(model_output, x)
    return _KERNELS[backend](model_output, x, noise, coefs, mode, clip, guided, cfg_scale,
                             guide_channels)


@_sampler_step_op.register_fake
def _(model_output, x, noise, coefs, mode, clip, guided, cfg_scale, guide_channels):
    return x.new_empty(x.shape, dtype=coefs.dtype), x.new_empty(x.shape, dtype=coefs.dtype)


def _register_native_fakes() -> None:
    if _backends._probe("cpu") is not None:
        return

    @torch.library.register_fake("dit_fast::sampler_step_fwd")
    def _(model_output, x, noise, coefs, mode, clip, guided, cfg_scale, guide_channels):
        return x.new_empty(x.shape, dtype=coefs.dtype), x.new_empty(x.shape, dtype=coefs.dtype)


_register_native_fakes()


def _pick(model_output: Tensor, x: Tensor) -> str:
    backend = _backends.select(OP_NAME, x)
    if backend != "reference" and model_output.dtype not in _MODEL_DTYPES[backend]:
        if _backends.requested_backend() != "auto":
            raise RuntimeError(f"dit_fast: backend {backend!r} was requested for {OP_NAME!r} but "
                               f"does not support a {model_output.dtype} model output")
        backend = "reference"
    return backend


# ---- public API -----------------------------------------------------------------------------

def _check(fn, model_output, x, noise, coefs, mode, cfg_scale, guide_channels):
    for name, t in (("model_output", model_output), ("x", x), ("coefs", coefs)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be (N, C, ...), got shape {tuple(x.shape)}")
    for name, t in (("x", x), ("model_output", model_output)):
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
    N, C = x.shape[:2]
    guided = cfg_scale is not None
    B = 2 * N if guided else N
    need = 2 * C if mode == MODE_DDPM_LEARNED_RANGE else C
    ms = tuple(model_output.shape)
    if (model_output.dim() != x.dim() or ms[0] != B or ms[2:] != tuple(x.shape[2:])
            or ms[1] < need):
        what = "2N (conditional half, then unconditional) " if guided else ""
        raise ValueError(f"{fn}: model_output must have shape ({B}, {need}"
                         f"{', ...' if x.dim() > 2 else ''}) with batch {what}matching x "
                         f"{tuple(x.shape)}, got {ms}")
    if model_output.device != x.device:
        raise ValueError(f"{fn}: model_output must be on x's device ({x.device}), got {model_output.device}")
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != x.shape:
            raise ValueError(f"{fn}: noise must be None or a tensor of x's shape {tuple(x.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        if noise.device != x.device:
            raise ValueError(f"{fn}: noise must be on x's device ({x.device}), got {noise.device}")
    if coefs.shape != (N, NUM_COEFS) or not coefs.is_floating_point():
        raise ValueError(f"{fn}: coefs must be a floating-point ({N}, {NUM_COEFS}) tensor (see "
                         f"ddpm_coefs / ddim_coefs), got {coefs.dtype} {tuple(coefs.shape)}")
    if coefs.device != x.device:
        raise ValueError(f"{fn}: coefs must be on x's device ({x.device}), got {coefs.device}")
    if guided:
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
            raise ValueError(f"{fn}: cfg_scale must be a number or None, got {cfg_scale!r}")
        if guide_channels is not None and (isinstance(guide_channels, bool)
                                           or not isinstance(guide_channels, int)
                                           or not 0 <= guide_channels <= C):
            raise ValueError(f"{fn}: guide_channels must be an int in [0, {C}] or None (all), got "
                             f"{guide_channels!r}")
    elif guide_channels is not None:
        raise ValueError(f"{fn}: guide_channels needs cfg_scale (guidance)")


def _fused_ok(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor) -> bool:
    f64 = x.dtype == torch.float64
    return ((model_output.dtype == torch.float64) == f64
            and coefs.dtype == (torch.float64 if f64 else torch.float32)
            and (noise is None or noise.dtype == x.dtype)
            and not (torch.is_grad_enabled()
                     and any(t is not None and t.requires_grad
                             for t in (model_output, x, noise, coefs))))


@nvtx.annotate("dit_fast.sampler_step")
def sampler_step(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor, *,
                 mode: int, clip_denoised: bool = True, cfg_scale: Optional[float] = None,
                 guide_channels: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The fused step; mode: MODE_DDPM_LEARNED_RANGE, MODE_DDPM_FIXED or MODE_DDIM. Returns
    (sample, pred_xstart), both (N, C, ...) float32 (float64 for float64 data).

    model_output: (N, Cm, ...) or, with guidance, (2N, Cm, ...); Cm >= 2C for the learned range
    (eps then v channels), >= C otherwise. x, noise: (N, C, ...); noise None: no noise term.
    coefs: (N, 8) from ddpm_coefs / ddim_coefs (float32; float64 for float64 data).
    """
    fn = "sampler_step"
    if mode not in (MODE_DDPM_LEARNED_RANGE, MODE_DDPM_FIXED, MODE_DDIM):
        raise ValueError(f"{fn}: mode must be MODE_DDPM_LEARNED_RANGE, MODE_DDPM_FIXED or MODE_DDIM, "
                         f"got {mode!r}")
    _check(fn, model_output, x, noise, coefs, mode, cfg_scale, guide_channels)
    return _run(model_output, x, noise, coefs, mode, clip_denoised, cfg_scale, guide_channels)


def _run(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor, mode: int,
         clip_denoised: bool, cfg_scale: Optional[float],
         guide_channels: Optional[int]) -> Tuple[Tensor, Tensor]:
    """`sampler_step` without the argument checks (for callers that validated them, such as
    GaussianDiffusion's sampling loops, where the step is on the per-step critical path)."""
    guided = cfg_scale is not None
    if not _fused_ok(model_output, x, noise, coefs):
        return sampler_step_ref(model_output, x, noise, coefs, mode, clip_denoised, cfg_scale,
                                guide_channels)
    N, C = x.shape[:2]
    G = C if guide_channels is None else int(guide_channels)
    scale = float(cfg_scale) if guided else 0.0
    m3 = model_output.reshape(model_output.shape[0], model_output.shape[1], -1).contiguous()
    x3 = x.reshape(N, C, -1).contiguous()
    n3 = None if noise is None else noise.reshape(N, C, -1).contiguous()
    c2 = coefs.contiguous()
    if torch.compiler.is_compiling():
        sample, pred = _sampler_step_op(m3, x3, n3, c2, mode, bool(clip_denoised), guided, scale, G)
    else:
        sample, pred = _KERNELS[_pick(m3, x3)](m3, x3, n3, c2, mode, bool(clip_denoised), guided,
                                               scale, G)
    return sample.view(x.shape), pred.view(x.shape)


def ddpm_step(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor, *,
              learned_range: bool = True, clip_denoised: bool = True,
              cfg_scale: Optional[float] = None,
              guide_channels: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """One fused DDPM (ancestral) step; see `sampler_step`. learned_range=False: fixed variance
    (coefs[:, 4] holds its log variance)."""
    mode = MODE_DDPM_LEARNED_RANGE if learned_range else MODE_DDPM_FIXED
    return sampler_step(model_output, x, noise, coefs, mode=mode, clip_denoised=clip_denoised,
                        cfg_scale=cfg_scale, guide_channels=guide_channels)


def ddim_step(model_output: Tensor, x: Tensor, noise: Optional[Tensor], coefs: Tensor, *,
              clip_denoised: bool = True, cfg_scale: Optional[float] = None,
              guide_channels: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """One fused DDIM step; see `sampler_step`."""
    return sampler_step(model_output, x, noise, coefs, mode=MODE_DDIM, clip_denoised=clip_denoised,
                        cfg_scale=cfg_scale, guide_channels=guide_channels)
