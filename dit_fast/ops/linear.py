"""DiT's Linear layers in CPU inference on a packed-weight GEMM with the bias (and, for fc1, the
GELU) in its epilogue (csrc/cpu/gemm.cpp):

    linear(module, x)                     = module(x)            module an nn.Linear
    packed_linear(x, weight, bias, gelu)  = F.linear(x, weight, bias), then gelu_tanh if gelu

On this project's 2-core AVX2 CPU, MKL's fp32 GEMM runs DiT-S/2's Linear shapes (2048 rows,
K = 384 / 1536) at roughly half of the FMA peak; the 6x16 AVX2 micro-kernel over a weight packed
once runs them somewhat faster (bench/throughput.py's dit_fast-blas row measures the model
without it, bench/cpu_gemm.py the GEMMs alone).

When the packed GEMM runs (`packed_gemm_applies`): eager inference (no autograd, not compiling,
no dispatch mode), float32 CPU tensors and no CPU autocast, at least `MIN_ROWS` rows, and the
``cpu`` backend chosen for op ``"linear"`` — under ``auto`` only where dit_fast._C is built and
the CPU kernels run their AVX2 path (the generic kernel is slower than torch's BLAS); a forced
``cpu`` backend runs it on either ISA (and raises if dit_fast._C is missing). Everything else —
training, torch.compile, other dtypes and devices, the reference backend, a Linear with hooks or
a subclass (LoRA wrappers) — runs the module / ``F.linear`` unchanged.

Packed weights are cached per weight tensor and rebuilt when its data_ptr, ``_version`` or shape
changes (in-place edits, optimizer steps, ``load_state_dict``, ``.to()``); writes through
``param.data`` bypass the version counter: call `clear_packed_weights()` after those. The cache
holds one packed copy (about the weight's size) per Linear weight used in CPU inference.

Reference: `linear_ref` (= F.linear). Error: a different summation order from torch's GEMM, held
by tests/test_linear.py to at most 2x torch's own float32 error against float64.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, validation
from ._eager import eager_inference

__all__ = ["linear", "linear_ref", "packed_linear", "packed_gemm_applies", "clear_packed_weights",
           "OP_NAME", "MIN_ROWS"]

OP_NAME = "linear"
MIN_ROWS = 32  # below this (the adaLN / timestep GEMMs: one row per sample) torch's GEMM is used
_ENV_OFF = "DIT_FAST_CPU_GEMM"  # =0 turns the packed GEMM off (benchmarks: torch's GEMM instead)


def _avx2_reason(_t: Tensor) -> Optional[str]:
    from .. import _C  # runs only after the cpu probe passed: dit_fast._C imports
    isa = _C.cpu_isa()
    if isa != "avx2":
        return (f"the CPU kernels run their {isa} path here; its scalar GEMM is slower than torch's "
                f"BLAS, so auto keeps torch's GEMM (force the cpu backend to run it anyway)")
    return None


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: the packed GEMM (plain and with the GELU epilogue)
    on x (rows, K) with K = like's last dim, 37 output features (a partial micro-tile) and
    MIN_ROWS + 5 rows (like's rows if `exact`). Bound: tolerance + twice torch's own error."""
    K = like.shape[-1] if like.dim() >= 2 and like.shape[-1] else 64
    rows = like.numel() // max(K, 1) if exact else MIN_ROWS + 5
    x = validation.randn((rows, K), like)
    w = validation.randn((37, K), like, seed=1, scale=K ** -0.5)
    b = validation.randn((37,), like, seed=2)

    def run(gelu):
        def fn(backend, x, w, b):
            if backend == "reference":
                out = F.linear(x, w, b)
                return F.gelu(out, approximate="tanh") if gelu else out
            return packed_linear(x, w, b, gelu=gelu)
        return fn

    return validation.run_phases(OP_NAME, backend, [
        validation.phase(name, run(gelu), (x, w, b), ("out",), peer=lambda g=gelu: run(g)(
            "reference", x, w, b)) for name, gelu in (("fwd", False), ("fwd gelu", True))])


_backends.register_op(OP_NAME, {"reference": None, "cpu": (torch.float32,)},
                      supports={"cpu": _avx2_reason}, shape_class=lambda t: None,
                      validate=_validate,
                      examples=lambda device, dtype: [torch.empty(2, 256, 1152, device=device,
                                                                  dtype=dtype),
                                                      torch.empty(1, 37, 389, device=device,
                                                                  dtype=dtype)])


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference: ``F.linear(x, weight, bias)``."""
    return F.linear(x, weight, bias)


# ---- packed-weight cache --------------------------------------------------------------------

_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref(weight), key, packed)


def clear_packed_weights() -> None:
    """Drops every cached packed weight (needed only after writes through ``param.data``)."""
    _PACKED.clear()


def _packed_weight(weight: Tensor) -> Tensor:
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    wid = id(weight)
    entry = _PACKED.get(wid)
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    packed = torch.ops.dit_fast.linear_pack(weight.detach().contiguous())
    ref = weakref.ref(weight, lambda _r, wid=wid: _PACKED.pop(wid, None))
    _PACKED[wid] = (ref, key, packed)
    return packed


# ---- dispatch -------------------------------------------------------------------------------

def packed_gemm_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether `packed_linear` serves this call (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if x.dim() < 1 or x.numel() < MIN_ROWS * max(x.shape[-1], 1):
        return False
    if os.environ.get(_ENV_OFF, "1").strip() == "0" or torch.is_autocast_enabled("cpu"):
        return False
    if not eager_inference(x, weight, bias):
        return False
    requested = _backends.requested_backend()
    if requested == "cpu":  # forced: either ISA, and a missing dit_fast._C raises
        reason = _backends._probe("cpu")
        if reason is not None:
            raise RuntimeError(f"dit_fast: backend 'cpu' was requested for {OP_NAME!r}, but it "
                               f"cannot run: {reason}")
        return True
    return requested == "auto" and _backends.select(OP_NAME, x) == "cpu"


def packed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then GELU-tanh if `gelu`) on the packed-weight GEMM, float32
    CPU tensors only; callers check `packed_gemm_applies` first. x (..., K), weight (N, K)."""
    return torch.ops.dit_fast.linear_packed(x.contiguous(), _packed_weight(weight), bias,
                                            weight.shape[0], gelu)


def _plain(module: nn.Module) -> bool:
    """An unmodified nn.Linear: exact type, no hooks (its forward is F.linear(x, w, b))."""
    return (type(module) is nn.Linear and not module._forward_hooks
            and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for DiT's Linear layers: the packed GEMM where it applies, else the module."""
    if _plain(module) and packed_gemm_applies(x, module.weight, module.bias):
        return packed_linear(x, module.weight, module.bias)
    return module(x)
