"""Triton kernels for bias + GELU(tanh approximation) (dit_fast.ops.gelu; math as
csrc/common/gelu.h):

    out = gelu_tanh(h + bias) = v / (1 + exp(-2u)),  u = sqrt(2/pi) (v + 0.044715 v^3),  v = h + bias

h, out (M, F) contiguous (out may be h: in place), bias (F,). 2-D tiles of BLOCK_M x BLOCK_F,
fp32 math. The sigmoid form needs one exp and never forms 1 + tanh(u); the exp argument is clamped
and the far negative tail flushed to exactly 0, so no inf * 0 appears (see csrc/common/gelu.h).
Backward: one program per (row chunk, column block) writing dh and a float32 partial column sum
of dh; the launcher sums the partials over chunks in a fixed order (deterministic, no atomics).
Storage dtypes: float32, bfloat16, float16.

`linear_gelu_fwd` is a GEMM with the bias + GELU epilogue in registers (inference: the (M, F)
pre-activation never goes to memory): out = gelu_tanh(x @ W.T + bias), fp32 accumulation,
grouped tile order for L2 reuse. Block sizes are the Triton tutorial's starting points; they have
not been tuned on a GPU.
"""

import math
import os

import torch
import triton
import triton.language as tl

from ._launch import on_tensor_device

__all__ = ["gelu_bias_fwd", "gelu_bias_bwd", "linear_gelu_fwd", "AOT_SPECS"]

_BETA = 0.7978845608028654     # sqrt(2 / pi)
_KAPPA = 0.044715
_CLAMP = 87.0                  # exp(87) < FLT_MAX


@triton.jit
def _gelu_terms(v):
    """(a, e, s): a = -2u, e = exp(clamp(a)), s = sigmoid(2u) flushed to 0 where a >= clamp."""
    a = -2.0 * 0.7978845608028654 * (v + 0.044715 * v * v * v)
    e = tl.exp(tl.minimum(tl.maximum(a, -87.0), 87.0))
    s = tl.where(a >= 87.0, 0.0, 1.0 / (1.0 + e))
    return a, e, s


@triton.jit
def _gelu_grad(v):
    a, e, s = _gelu_terms(v)
    mid = s + 2.0 * 0.7978845608028654 * ((e * s) * s) * v * (1.0 + 3.0 * 0.044715 * v * v)
    return tl.where(a >= 87.0, 0.0, tl.where(a <= -87.0, 1.0, mid))


@triton.jit
def _gelu_bias_fwd_kernel(H, B, OUT, M, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    mask = (rows[:, None] < M) & cmask[None, :]
    off = rows[:, None] * F + cols[None, :]
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    v = tl.load(H + off, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    _a, _e, s = _gelu_terms(v)
    tl.store(OUT + off, (v * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bias_bwd_kernel(DOUT, H, B, DH, PART, M, F, per_chunk, BLOCK_M: tl.constexpr,
                          BLOCK_F: tl.constexpr):
    # program (c, j): rows [c * per_chunk, min((c + 1) * per_chunk, M)), columns block j.
    c = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    cmask = cols < F
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    r0 = c.to(tl.int64) * per_chunk
    r1 = tl.minimum(r0 + per_chunk, M)
    for m0 in range(r0, r1, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < r1) & cmask[None, :]
        off = rows[:, None] * F + cols[None, :]
        v = tl.load(H + off, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        do = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
        dh = tl.where(mask, do * _gelu_grad(v), 0.0)
        tl.store(DH + off, dh.to(DH.dtype.element_ty), mask=mask)
        acc += tl.sum(dh, axis=0)
    tl.store(PART + c.to(tl.int64) * F + cols, acc, mask=cmask)


@triton.jit
def _linear_gelu_kernel(X, W, B, OUT, M, N, K, stride_xm, stride_wn, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr):
    # OUT[m, n] = gelu_tanh(sum_k X[m, k] W[n, k] + B[n]); X (M, K), W (N, K), unit inner strides.
    # UPCAST: fp32 operands for tl.dot (Triton's interpreter mishandles bf16 dots; False on GPUs).
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    bias = tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)
    v = acc + bias[None, :]
    _a, _e, s = _gelu_terms(v)
    out_ptrs = OUT + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, (v * s).to(OUT.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


# ---- launchers ------------------------------------------------------------------------------

def _config(F: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps): ~4096-element tiles (~16 fp32 per thread at 8 warps)."""
    BF = min(max(16, triton.next_power_of_2(max(F, 1))), 1024)
    BM = max(1, 4096 // BF)
    return BM, BF, 8 if BM * BF >= 4096 else 4


def _flat(t: torch.Tensor, F: int) -> torch.Tensor:
    return t.reshape(-1, F) if F > 0 else t.reshape(0, 0)


@on_tensor_device
def gelu_bias_fwd(h: torch.Tensor, bias: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """gelu_tanh(h + bias) into `out` (new if None; may be h itself). h (..., F) contiguous."""
    h = h.contiguous()
    bias = bias.contiguous()
    if out is None:
        out = torch.empty_like(h)
    F = h.shape[-1]
    M = h.numel() // F if F > 0 else 0
    if M * F == 0:
        return out
    BM, BF, nw = _config(F)
    _gelu_bias_fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(F, BF))](
        h, bias, out, M, F, BLOCK_M=BM, BLOCK_F=BF, num_warps=nw)
    return out


def _chunks(M: int, F: int, BM: int, BF: int, target_programs: int = 512) -> tuple[int, int]:
    n_f = triton.cdiv(F, BF)
    want = max(1, triton.cdiv(target_programs, n_f))
    C = max(1, min(want, triton.cdiv(M, BM)))
    per = triton.cdiv(triton.cdiv(M, C), BM) * BM
    return triton.cdiv(M, per), per


@on_tensor_device
def gelu_bias_bwd(dout: torch.Tensor, h: torch.Tensor, bias: torch.Tensor):
    """(dh, dbias) in h's dtype."""
    dout, h, bias = dout.contiguous(), h.contiguous(), bias.contiguous()
    dh = torch.empty_like(h)
    F = h.shape[-1]
    M = h.numel() // F if F > 0 else 0
    if M * F == 0:
        return dh, torch.zeros((F,), device=h.device, dtype=h.dtype)
    BM, BF, nw = _config(F)
    C, per = _chunks(M, F, BM, BF)
    part = torch.empty((C, F), device=h.device, dtype=torch.float32)
    _gelu_bias_bwd_kernel[(C, triton.cdiv(F, BF))](
        dout, h, bias, dh, part, M, F, per, BLOCK_M=BM, BLOCK_F=BF, num_warps=nw)
    return dh, part.sum(0).to(h.dtype)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gemm_config(dtype: torch.dtype) -> dict:
    """Starting points from the Triton matmul tutorial (untuned). fp32 uses exact
    ("ieee") products, as F.linear does without allow_tf32."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, DOT_PRECISION="ieee",
                    num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, DOT_PRECISION="ieee",
                num_warps=8, num_stages=3)


@on_tensor_device
def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) in one kernel; x (..., K), weight (F, K), bias (F,)."""
    K = x.shape[-1]
    Fdim = weight.shape[0]
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, K)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if K <= 1 or weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous()
    out = torch.empty((M, Fdim), device=x.device, dtype=x.dtype)
    if M * Fdim == 0:
        return out.reshape(*x.shape[:-1], Fdim)
    if K == 0:  # empty sum: gelu(bias)
        return gelu_bias_fwd(out.zero_(), bias, out=out).reshape(*x.shape[:-1], Fdim)
    cfg = _gemm_config(x.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(Fdim, cfg["BLOCK_N"]),)
    _linear_gelu_kernel[grid](x2, w, bias, out, M, Fdim, K, x2.stride(0), w.stride(0),
                              out.stride(0), UPCAST=_interpreting(), **cfg)
    return out.reshape(*x.shape[:-1], Fdim)


# ---- ahead-of-time compilation specs ----------------------------------------------------------

def _aot_specs() -> list:
    specs = []
    BM, BF, _ = _config(4608)
    for p in ("*fp32", "*bf16"):
        specs.append((_gelu_bias_fwd_kernel,
                      {"H": p, "B": p, "OUT": p, "M": "i32", "F": "i32"},
                      {"BLOCK_M": BM, "BLOCK_F": BF}))
        specs.append((_gelu_bias_bwd_kernel,
                      {"DOUT": p, "H": p, "B": p, "DH": p, "PART": "*fp32", "M": "i32", "F": "i32",
                       "per_chunk": "i32"},
                      {"BLOCK_M": BM, "BLOCK_F": BF}))
    for dtype, p in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16")):
        cfg = {k: v for k, v in _gemm_config(dtype).items() if k not in ("num_warps", "num_stages")}
        cfg["UPCAST"] = False
        specs.append((_linear_gelu_kernel,
                      {"X": p, "W": p, "B": p, "OUT": p, "M": "i32", "N": "i32", "K": "i32",
                       "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32"},
                      cfg))
    return specs


AOT_SPECS = _aot_specs()
