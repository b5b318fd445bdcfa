"""The Taylor forecast of a cached feature in one pass (TaylorSeer, Liu et al. 2025, "From Reusing
to Forecasting: Accelerating Diffusion Models with TaylorSeers"):

    out = sum_{i < K} w[i] * factors[i],      w[i] = k^i / i!  (taylor_weights)

factors[0] is a feature cached at the last full model evaluation, factors[i] its i-th finite
difference per sampling step (dit_fast.sampling.TaylorCache keeps them); k is the number of steps
since that evaluation. `out` (the feature's buffer) is written in place.

factors: (K, *shape) float32 (float64 for float64 out), contiguous; out: (*shape) float32, bfloat16,
float16 or float64, contiguous. The sum runs in the factors' dtype in order i = 0..K-1, a separate
multiply and add per term (no fused multiply-add), then one rounding to out's dtype: the reference,
the CPU kernel and the Triton kernel round alike. Backends (picked by out's dtype and device, see
dit_fast._backends): reference (PyTorch), cpu (csrc/cpu/forecast.cpp), triton
(dit_fast/kernels/triton/forecast.py; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 when
forced). No CUDA kernel: an element-wise sum is memory-bound and the Triton kernel serves GPUs.

Not differentiable (sampling runs under no_grad): with grad enabled and an input requiring grad,
the PyTorch reference runs.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backends, nvtx, validation
from ._eager import eager_inference

__all__ = ["taylor_forecast", "taylor_forecast_ref", "taylor_weights", "OP_NAME", "MAX_FACTORS"]

OP_NAME = "taylor_forecast"
MAX_FACTORS = 16  # order <= 15 (csrc/cpu/forecast.h)



def _probe_cpu() -> Optional[str]:
    """The cpu backend's probe, plus: the built dit_fast._C has this op (an extension built before
    the op existed must fall back, not fail)."""
    reason = _backends._probe("cpu")
    if reason is None and not hasattr(torch.ops.dit_fast, "taylor_forecast_"):
        reason = "dit_fast._C was built without taylor_forecast_ (rebuild the extension)"
    return reason


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: a second-order forecast (3 factors, 2 steps ahead) into
    an out built like `like`, against the float64 sum."""
    if like.dim() < 1 or like.numel() == 0:
        like = like.new_empty(2, 5, 64)
    shape = validation.small_shape(like, exact)
    fdt = torch.float64 if like.dtype == torch.float64 else torch.float32
    factors = torch.stack([validation.randn(shape, like, seed=i).to(fdt) for i in range(3)])
    w = taylor_weights(2.0, 3)

    def run(b, factors):
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        _KERNELS[b](out, factors, w)
        return out

    return validation.run_phases(OP_NAME, backend, [
        validation.phase("fwd", run, (factors,), ("out",),
                         truth=lambda got: taylor_forecast_ref(factors.double(), w))],
        dtype=like.dtype)


# Keyed by out's dtype (the factors are float32, float64 for float64 out).
_backends.register_op(OP_NAME, {
    "reference": None,
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}, probes={"cpu": _probe_cpu}, validate=_validate,
    examples=lambda device, dtype: [torch.empty(2, 256, 1152, device=device, dtype=dtype),
                                    torch.empty(3, 5, 1000, device=device, dtype=dtype)])


def taylor_weights(k: float, n: int) -> List[float]:
    """[k^i / i! for i < n]: the Taylor expansion's weights k steps after the expansion point."""
    return [float(k) ** i / math.factorial(i) for i in range(n)]


def taylor_forecast_ref(factors: Tensor, weights: Sequence[float]) -> Tensor:
    """sum_i weights[i] * factors[i] in factors' dtype (the kernels' operation order)."""
    acc = factors[0] * float(weights[0])
    for i in range(1, len(weights)):
        acc = acc + factors[i] * float(weights[i])
    return acc


# ---- backend kernels: (out, factors, weights) -> None, out written in place --------------------

def _k_reference(out: Tensor, factors: Tensor, weights: List[float]) -> None:
    out.copy_(taylor_forecast_ref(factors, weights))


def _k_cpu(out: Tensor, factors: Tensor, weights: List[float]) -> None:
    torch.ops.dit_fast.taylor_forecast_(out, factors, weights)


def _k_triton(out: Tensor, factors: Tensor, weights: List[float]) -> None:
    from ..kernels.triton import forecast as K
    K.taylor_forecast_(out, factors, weights)


_KERNELS: Dict[str, Callable[[Tensor, Tensor, List[float]], None]] = {
    "reference": _k_reference, "cpu": _k_cpu, "triton": _k_triton}


@torch.library.custom_op("dit_fast::taylor_forecast", mutates_args=("out",))
def _taylor_forecast_op(out: Tensor, factors: Tensor, weights: List[float]) -> None:
    _KERNELS[_backends.select(OP_NAME, out)](out, factors, weights)


@_taylor_forecast_op.register_fake
def _(out, factors, weights):
    return None


def _check(factors: Tensor, weights: Sequence[float], out: Optional[Tensor]) -> List[float]:
    fn = "taylor_forecast"
    if not isinstance(factors, Tensor):
        raise ValueError(f"{fn}: factors must be a torch.Tensor, got {type(factors).__name__}")
    if factors.dtype not in (torch.float32, torch.float64) or factors.dim() < 1:
        raise ValueError(f"{fn}: factors must be a float32 or float64 tensor (K, ...), got {factors.dtype} "
                         f"of shape {tuple(factors.shape)}")
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: weights must be a sequence of numbers, got {weights!r}") from None
    K = factors.shape[0]
    if not 1 <= len(w) <= MAX_FACTORS or len(w) != K:
        raise ValueError(f"{fn}: weights must hold one value per factor (factors.shape[0] = {K}, at most "
                         f"{MAX_FACTORS}), got {len(w)}")
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"{fn}: weights must be finite, got {w}")
    if not factors.is_contiguous():
        raise ValueError(f"{fn}: factors must be contiguous")
    if out is not None:
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(factors.shape[1:]):
            raise ValueError(f"{fn}: out must be a tensor of shape {tuple(factors.shape[1:])} (factors.shape[1:]), "
                             f"got {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        f64 = factors.dtype == torch.float64
        ok = (out.dtype == torch.float64) if f64 else out.dtype in (torch.float32, torch.bfloat16, torch.float16)
        if not ok:
            raise ValueError(f"{fn}: out must be float64 for float64 factors, else float32, bfloat16 or float16; "
                             f"got {out.dtype} with {factors.dtype} factors")
        if out.device != factors.device:
            raise ValueError(f"{fn}: out must be on factors' device ({factors.device}), got {out.device}")
        if not out.is_contiguous():
            raise ValueError(f"{fn}: out must be contiguous")
    return w


@nvtx.annotate("dit_fast.taylor_forecast")
def taylor_forecast(factors: Tensor, weights: Sequence[float], out: Optional[Tensor] = None) -> Tensor:
    """out = sum_i weights[i] * factors[i] (see the module docstring); returns out (allocated with
    factors' dtype when None)."""
    w = _check(factors, weights, out)
    if out is None:
        out = torch.empty(factors.shape[1:], dtype=factors.dtype, device=factors.device)
    if torch.is_grad_enabled() and (factors.requires_grad or out.requires_grad):
        return out.copy_(taylor_forecast_ref(factors, w))
    if eager_inference(out, factors):
        _KERNELS[_backends.select(OP_NAME, out)](out, factors, w)
    else:
        _taylor_forecast_op(out, factors, w)
    return out
