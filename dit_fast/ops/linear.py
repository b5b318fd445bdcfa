"""DiT's Linear layers in CPU inference (the token Linears qkv, proj, fc1 + GELU, fc2, final, and the
stacked adaLN projection), on the fastest GEMM measured for the CPU and dtype, with the bias (and
for fc1 the tanh-GELU) in the GEMM's epilogue:

    linear(module, x)                  = module(x)            module an nn.Linear
    cpu_linear(x, weight, bias, gelu)  = F.linear(x, weight, bias), then gelu_tanh if gelu

GEMMs (`linear_paths` gives the choice on this machine, bench/results/cpu-gemm-<isa>.json the figures):
- ``onednn``:   torch.ops.mkldnn._linear_pointwise on the plain (N, K) weight (oneDNN inside torch,
                bias / GELU fused, every ISA from AVX2 to AMX). A private torch op: used only where
                this torch has it.
- ``dit_fast``: dit_fast._C's packed-weight GEMM (csrc/cpu/gemm.cpp, AVX2 6x16 micro-kernel); the
                fastest on AVX2-only CPUs (bench/results/cpu-bf16-avx2.md), float32 or bf16
                (bf16 operands widened inside the GEMM: no copies).
- ``torch``:    F.linear (MKL), where neither runs.
float32, where dit_fast._C runs its AVX2 path on a CPU without AVX-512: every Linear on ``dit_fast``
(1-2.5% faster than MKL in the model, oneDNN 7-30% slower; bench/results/cpu-bf16-avx2.md);
elsewhere ``onednn`` (not measured in the model). bfloat16: on CPUs with bf16 dot products
(AVX512_BF16 / AMX) ``onednn`` in bf16; on AVX2-only CPUs every Linear on ``dit_fast`` with bf16
operands (float32 sums, one rounding of the output); elsewhere the float32 GEMM on float32 copies
of the operands, rounded back to bf16 (torch's bf16 GEMM is much slower there).

No weight cache: the ``dit_fast`` GEMM reorders the weight in every call (a K x N pass shared by
the threads, small next to the M x K x N GEMM) into scratch memory, oneDNN and MKL read the plain
weight, and bf16 weights are widened per call. So no route of changing weights (param.data writes,
optimizer steps, load_state_dict, .to(), deepcopy) can leave a stale copy.

Few rows (at most `FEW_ROWS`: the adaLN projection, one row per sample), without GELU: where
dit_fast._C runs its AVX2 path on a CPU without AVX-512 (where it was measured), its few-rows kernel, which reads the weight once in place (2-3x
MKL's GEMM at adaLN's shapes, bench/results/cpu-bf16-avx2.md); bf16 weights are widened per call.

When it runs (`cpu_linear_applies`): inference (no tensor needs a gradient), CPU tensors of one dtype,
float32 or bfloat16, no CPU autocast, at least `MIN_ROWS` rows (or at most `FEW_ROWS` where the
few-rows kernel runs), ``DIT_FAST_CPU_GEMM`` not 0, and in
eager mode no torch dispatch mode (FlopCounterMode sees F.linear) and the ``cpu`` backend chosen for
op ``"linear"``. Under torch.compile it is the custom op ``dit_fast::cpu_linear`` (fake kernel,
registered autograd), which checks the backend when it runs: compiled models keep these GEMMs.
Everything else (training, the reference backend, a Linear with hooks or a subclass such as a LoRA
wrapper) runs the module / ``F.linear`` unchanged.

Reference: `linear_ref` (= F.linear). Error: a different summation order from torch's GEMM, held by
tests/test_linear.py to at most 2x torch's own float32 error against float64 (bf16: the bf16 table).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, validation
from ._eager import eager_inference

__all__ = ["linear", "linear_ref", "cpu_linear", "cpu_linear_applies", "linear_paths", "cpu_isa_info",
           "OP_NAME", "MIN_ROWS", "FEW_ROWS"]

OP_NAME = "linear"
MIN_ROWS = 32  # token GEMMs from this many rows on; below, only the few-rows kernel (FEW_ROWS)
FEW_ROWS = 16  # up to this many rows (adaLN: one per sample) dit_fast's few-rows kernel (cpu/gemm.h)
_ENV_OFF = "DIT_FAST_CPU_GEMM"  # =0 turns these GEMMs off (benchmarks: torch's GEMM instead)
_DTYPES = (torch.float32, torch.bfloat16)


def linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Reference: ``F.linear(x, weight, bias)``."""
    return F.linear(x, weight, bias)


# ---- CPU ISA ----------------------------------------------------------------------------------

_ISA_FLAGS = ("avx2", "fma3", "f16c", "avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_vnni",
              "avx512_bf16", "avx_ne_convert", "avx_vnni", "amx_tile", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_caps() -> dict:
    return dict(torch._C._cpu._get_cpu_capability())


def _dit_isa() -> Optional[str]:
    """ISA of dit_fast._C's kernels now ("avx2" / "generic"), None when it is not built."""
    if _backends._probe("cpu") is not None:
        return None
    from .. import _C
    return _C.cpu_isa()


@functools.lru_cache(maxsize=None)
def _onednn_missing() -> Optional[str]:
    """None when oneDNN's fused linear can run here, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "torch is built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # private op: may go in a later torch
        return f"torch {torch.__version__} has no torch.ops.mkldnn._linear_pointwise"
    return None


@functools.lru_cache(maxsize=None)
def _onednn_bf16() -> bool:
    """oneDNN has a bf16 GEMM with bf16 dot products in hardware (AVX512_BF16 or AMX-BF16)."""
    caps = _cpu_caps()
    native = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return native and _onednn_missing() is None and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_isa_info() -> dict:
    """The CPU's ISA as dit_fast's CPU paths see it: ``model``; ``flags`` (the x86 features that
    matter here that this CPU has, from torch's cpuinfo); ``torch`` (the ISA torch's own kernels
    use); ``active`` (dit_fast._C's kernels: "avx2" / "generic", None when not built);
    ``native_bf16`` (bf16 dot products in hardware, used through oneDNN); ``summary`` (one line)."""
    caps = _cpu_caps()
    flags = [f for f in _ISA_FLAGS if caps.get(f)]
    active = _dit_isa()
    summary = (f"dit_fast._C {active or 'not built'}; torch {torch.backends.cpu.get_cpu_capability()}; "
               f"bf16 GEMM: {'native (oneDNN)' if _onednn_bf16() else 'float32 math'}; "
               f"flags: {' '.join(flags) or '-'}")
    return {"model": caps.get("cpu_name", ""), "flags": flags,
            "torch": torch.backends.cpu.get_cpu_capability(), "active": active,
            "native_bf16": _onednn_bf16(), "summary": summary}


# ---- GEMM choice --------------------------------------------------------------------------------

def _path(dtype: torch.dtype, gelu: bool, few: bool = False) -> tuple[Optional[str], torch.dtype, str]:
    """(GEMM or None: torch's own, compute dtype, why) for a Linear in `dtype` on this machine;
    `few`: at most FEW_ROWS rows."""
    isa, onednn = _dit_isa(), _onednn_missing()
    if dtype == torch.bfloat16 and _onednn_bf16():
        return "onednn", torch.bfloat16, "bf16 dot products in hardware"
    ours = isa == "avx2" and not _cpu_caps().get("avx512_f")  # where our GEMMs were measured
    if few and not gelu and ours:  # the weight read once, no reorder: 2-3x MKL's GEMM
        return "dit_fast", dtype, "few rows: the weight read once (bench/results/cpu-bf16-avx2.md)"
    if few:  # (DiT's few-row GEMMs, the adaLN and timestep projections, have no GELU epilogue)
        return None, dtype, ("few rows with GELU: unused by DiT" if gelu else
                             f"dit_fast._C runs {isa or 'nowhere'} here: its few-rows kernel is "
                             "measured only on AVX2 CPUs without AVX-512")
    if ours:  # in the model: 1-2.5% faster than MKL in 3 of 3 runs, oneDNN 7-30% slower
        gemm, why = "dit_fast", "fastest measured in the model on AVX2 (bench/results/cpu-bf16-avx2.md)"
    elif onednn is None:  # unmeasured in the model on these CPUs (GEMM alone: bench/cpu_gemm.py)
        gemm, why = "onednn", "dit_fast's GEMM does not run here; oneDNN at or above MKL in GEMMs alone"
    else:
        gemm, why = None, (f"oneDNN unavailable ({onednn}) and dit_fast._C runs "
                           f"{isa or 'nowhere'} here (its generic GEMM is slower than torch's)")
    if dtype == torch.bfloat16 and ours:  # bf16 operands, widened inside the GEMM: no copies
        return "dit_fast", torch.bfloat16, ("no bf16 dot products: float32 sums, bf16 operands "
                                            "widened inside the GEMM (bench/results/cpu-bf16-avx2.md)")
    if dtype == torch.bfloat16:  # no bf16 dot products: float32 GEMM on upcast operands
        return gemm or "torch", torch.float32, f"{why}; bf16 as float32 (no bf16 dot products)"
    return gemm, torch.float32, why


def linear_paths() -> dict[str, str]:
    """{"float32 linear" | "float32 linear+gelu" | "float32 linear (<= 16 rows)" | "bfloat16 ...":
    "<gemm> in <dtype>: why"}: the GEMM each kind of Linear runs in CPU inference on this machine
    (for backends() / explain())."""
    out = {}
    for dtype in _DTYPES:
        for gelu, few in ((False, False), (True, False), (False, True)):
            gemm, cdt, why = _path(dtype, gelu, few)
            name = f"{str(dtype)[6:]} linear{'+gelu' if gelu else ''}{f' (<= {FEW_ROWS} rows)' if few else ''}"
            out[name] = (f"{gemm} in {str(cdt)[6:]}: {why}" if gemm else f"torch (F.linear): {why}")
    return out


def _cpu_reason(t: Tensor) -> Optional[str]:
    """None when the cpu backend has a faster GEMM than torch's for `t`'s dtype, else why not."""
    gemm, _, why = _path(t.dtype, False)
    return None if gemm is not None else why


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: the cpu GEMM paths (plain and with the GELU epilogue
    on MIN_ROWS + 5 rows, or like's rows if `exact`; and the few-rows kernel on 3 rows) on x
    (rows, K) with K = like's last dim and 37 output features (partial tiles). Bound: tolerance +
    twice torch's own error."""
    K = like.shape[-1] if like.dim() >= 2 and like.shape[-1] else 64
    rows = like.numel() // max(K, 1) if exact else MIN_ROWS + 5
    x = validation.randn((rows, K), like)
    w = validation.randn((37, K), like, seed=1, scale=K ** -0.5)
    b = validation.randn((37,), like, seed=2)

    def run(gelu):
        def fn(backend, x, w, b):
            return _reference(x, w, b, gelu) if backend == "reference" else _run(x, w, b, gelu)
        return fn

    cases = [("fwd", False, x), ("fwd gelu", True, x)] + ([] if exact else [("fwd few rows", False, x[:3])])
    return validation.run_phases(OP_NAME, backend, [
        validation.phase(name, run(gelu), (xs, w, b), ("out",), peer=lambda g=gelu, xs=xs: run(g)(
            "reference", xs, w, b)) for name, gelu, xs in cases])


_backends.register_op(OP_NAME, {"reference": None, "cpu": _DTYPES}, supports={"cpu": _cpu_reason},
                      shape_class=lambda t: None, validate=_validate,
                      examples=lambda device, dtype: [torch.empty(2, 256, 1152, device=device,
                                                                  dtype=dtype),
                                                      torch.empty(1, 37, 389, device=device,
                                                                  dtype=dtype)])


# ---- kernels ------------------------------------------------------------------------------------

def _reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out


def _gemm(gemm: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    """One GEMM path on operands of one dtype; x (..., K) contiguous, weight (N, K)."""
    if gemm == "dit_fast":
        return torch.ops.dit_fast.linear_fwd(x, weight.contiguous(), bias, gelu)
    if gemm == "onednn":
        attr, alg = ("gelu", "tanh") if gelu else ("none", "")
        out = torch.ops.mkldnn._linear_pointwise(x, weight.contiguous(), bias, attr, [], alg)
        return out.view(*x.shape[:-1], weight.shape[0])
    return _reference(x, weight, bias, gelu)


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1) if x.dim() >= 1 else 0


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    gemm, cdt, _ = _path(x.dtype, gelu, few=_rows(x) <= FEW_ROWS)
    if gemm is None:  # a forced cpu backend where no GEMM beats torch's: the packed one
        gemm = "dit_fast"
    if cdt == x.dtype:
        return _gemm(gemm, x.contiguous(), weight, bias, gelu)
    up = [None if t is None else t.to(cdt) for t in (x, weight, bias)]
    return _gemm(gemm, up[0].contiguous(), up[1], up[2], gelu).to(x.dtype)


def _cpu_selected(x: Tensor) -> bool:
    """Whether the backend request (use_backend / DIT_FAST_BACKEND) gives op "linear" to cpu here."""
    requested = _backends.requested_backend()
    if requested == "cpu":  # forced: a missing dit_fast._C raises
        reason = _backends._probe("cpu")
        if reason is not None:
            raise RuntimeError(f"dit_fast: backend 'cpu' was requested for {OP_NAME!r}, but it "
                               f"cannot run: {reason}")
        return True
    return requested == "auto" and _backends.select(OP_NAME, x) == "cpu"


@torch.library.custom_op("dit_fast::cpu_linear", mutates_args=())
def _cpu_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    if x.device.type == "cpu" and x.dtype in _DTYPES and _cpu_selected(x):
        return _run(x, weight, bias, gelu)
    return _reference(x, weight, bias, gelu)


@_cpu_linear_op.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.gelu = gelu


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    if ctx.gelu:  # recompute the pre-activation (inference op: no saved h)
        dout = torch.ops.aten.gelu_backward(dout, F.linear(x, weight, bias), approximate="tanh")
    d2 = dout.reshape(-1, weight.shape[0])
    dx = dout @ weight
    dw = d2.t() @ x.reshape(-1, weight.shape[1])
    return dx, dw, None if bias is None else d2.sum(0), None


_cpu_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ---------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _few_rows_kernel(dtype: torch.dtype, gelu: bool) -> bool:
    """Whether the cpu backend has a faster GEMM than torch's for at most FEW_ROWS rows."""
    return _path(dtype, gelu, few=True)[0] is not None


def cpu_linear_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool = False) -> bool:
    """Whether `cpu_linear` serves this call (see the module docstring)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    rows = _rows(x)
    few = 1 <= rows <= FEW_ROWS and x.shape[-1] > 0
    if not (rows >= MIN_ROWS and x.shape[-1] > 0) and not (few and _few_rows_kernel(x.dtype, gelu)):
        return False
    if os.environ.get(_ENV_OFF, "1").strip() == "0" or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():  # the op checks the backend when it runs
        return not (torch.is_grad_enabled()
                    and any(t is not None and t.requires_grad for t in (x, weight, bias)))
    return eager_inference(x, weight, bias) and _cpu_selected(x)


def cpu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)`` (then GELU-tanh if `gelu`) on the GEMM `linear_paths` names,
    for CPU float32 / bfloat16 tensors; callers check `cpu_linear_applies` first. x (..., K),
    weight (N, K), bias (N,) or None; returns (..., N) in x's dtype."""
    if torch.compiler.is_compiling():
        return _cpu_linear_op(x, weight, bias, gelu)
    return _run(x, weight, bias, gelu)


def _plain(module: nn.Module) -> bool:
    """An unmodified nn.Linear: exact type, no hooks (its forward is F.linear(x, w, b))."""
    return (type(module) is nn.Linear and not module._forward_hooks
            and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks
            and not nn.modules.module._global_forward_pre_hooks)


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for DiT's Linear layers: `cpu_linear` where it applies, else the module."""
    if _plain(module) and cpu_linear_applies(x, module.weight, module.bias):
        return cpu_linear(x, module.weight, module.bias)
    return module(x)
