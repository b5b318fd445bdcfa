"""Triton kernels for bias + GELU(tanh approximation) (dit_fast.ops.gelu; math as
csrc/common/gelu.h):

    out = gelu_tanh(h + bias) = v / (1 + exp(-2u)),  u = sqrt(2/pi) (v + 0.044715 v^3),  v = h + bias

h, out (M, F) contiguous (out may be h: in place), bias (F,). 2-D tiles of BLOCK_M x BLOCK_F,
fp32 math. The sigmoid form needs one exp and never forms 1 + tanh(u); the exp argument is clamped
and the far negative tail flushed to exactly 0, so no inf * 0 appears (see csrc/common/gelu.h).
Backward: one program per (row chunk, column block) writing dh and a float32 partial column sum
of dh; the launcher sums the partials over chunks in a fixed order (deterministic, no atomics).
Storage dtypes: float32, bfloat16, float16.
"""

import torch
import triton
import triton.language as tl

__all__ = ["gelu_bias_fwd", "gelu_bias_bwd", "AOT_SPECS"]

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


# ---- launchers ------------------------------------------------------------------------------

def _config(F: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps): ~4096-element tiles (~16 fp32 per thread at 8 warps)."""
    BF = min(max(16, triton.next_power_of_2(max(F, 1))), 1024)
    BM = max(1, 4096 // BF)
    return BM, BF, 8 if BM * BF >= 4096 else 4


def _flat(t: torch.Tensor, F: int) -> torch.Tensor:
    return t.reshape(-1, F) if F > 0 else t.reshape(0, 0)


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
    return specs


AOT_SPECS = _aot_specs()
