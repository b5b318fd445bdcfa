"""Triton FlashAttention-2 (forward and backward) reading straight from the qkv GEMM's output.

Layouts (element strides; the innermost (3, H, Dh) / (H, Dh) dims must be contiguous):
  qkv  (N, T, 3*D) viewed as (N, T, 3, H, Dh): q = qkv[:, :, 0], k = qkv[:, :, 1], v = qkv[:, :, 2]
  out  (N, T, D)   viewed as (N, T, H, Dh): heads merged, ready for the proj Linear
  lse  (N, H, T)   float32, natural-log logsumexp of each row of the scaled scores
  dqkv (N, T, 3*D) same layout as qkv: dq, dk, dv are written in place, no concatenation

Algorithm (Dao, "FlashAttention-2", 2023):
  forward  one program per (query block, n*H + h); online softmax over key blocks with fp32
           running max / sum / accumulator, in base 2 (scores pre-multiplied by scale*log2(e));
           stores out and lse.
  backward delta = rowsum(dO * O) (preprocess kernel); dk/dv: one program per key block looping
           over query blocks; dq: one program per query block looping over key blocks (recomputes
           the scores instead of atomics, so results are deterministic).
Head dims: any Dh <= 128 works through a power-of-2 BLOCK_D with masking; the wrapper accepts the
ones we tune and test, 64, 72 (DiT-XL, BLOCK_D = 128) and 128 (`SUPPORTED_HEAD_DIMS`). Token counts
that do not divide the block sizes are masked. fp16 / bf16 operands go to tensor cores with fp32
accumulation (P and dS are rounded to the input dtype before their matmuls, like flash-attn);
fp32 operands use ``input_precision="ieee"`` (no TF32) to match PyTorch's fp32 SDPA.

Under TRITON_INTERPRET=1 (CPU tests) the constexpr UPCAST makes every tl.dot operand fp32 (after
the same roundings to the input dtype): the interpreter's dot multiplies raw bf16 bit patterns.

`AOT_SPECS` lists representative specializations for ahead-of-time compilation checks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "attention_fwd", "attention_bwd",
           "unsupported_reason", "AOT_SPECS"]

SUPPORTED_HEAD_DIMS = (64, 72, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LN2 = 0.6931471805599453
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    QKV, O, LSE,
    qk_scale,                       # softmax scale * log2(e)
    stride_qkv_n, stride_qkv_t,     # qkv strides (elements) along N and T
    stride_o_n, stride_o_t,         # out strides along N and T
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,           # T % BLOCK_N == 0: no key masking
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < T

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    q = tl.load(base + offs_m[:, None] * stride_qkv_t + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    in_dtype = q.dtype
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_kv = start_n + offs_n
        kv_mask = (offs_kv < T)[:, None] & mask_d[None, :]
        kv_off = offs_kv[:, None] * stride_qkv_t + offs_d[None, :]
        k = tl.load(base + D + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * D + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if not EVEN_N:
            s = tl.where((offs_kv < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p = p.to(in_dtype)
        if UPCAST:
            p = p.to(tl.float32)
        acc += tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = (O + n.to(tl.int64) * stride_o_n + h * HEAD_DIM
              + offs_m[:, None] * stride_o_t + offs_d[None, :])
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_nh.to(tl.int64) * T + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_o_n, stride_o_t, stride_do_n, stride_do_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + n.to(tl.int64) * stride_o_n + h * HEAD_DIM
                + offs_m[:, None] * stride_o_t + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM
                 + offs_m[:, None] * stride_do_t + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_nh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, DQKV,
    sm_scale, qk_scale,             # scale, scale * log2(e)
    stride_qkv_n, stride_qkv_t,     # qkv strides; dqkv is contiguous with the same shape
    stride_do_n, stride_do_t,
    stride_dqkv_n, stride_dqkv_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (key block, n*H + h): dk and dv of that block, looping over query blocks."""
    pid_n = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_kv = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_kv < T)[:, None] & mask_d[None, :]

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    do_base = DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM
    row_base = pid_nh.to(tl.int64) * T
    kv_off = offs_kv[:, None] * stride_qkv_t + offs_d[None, :]
    k = tl.load(base + D + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(base + 2 * D + kv_off, mask=kv_mask, other=0.0)
    in_dtype = k.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, T, BLOCK_M):
        offs_q = start_m + offs_m
        mask_q = offs_q < T
        q_mask = mask_q[:, None] & mask_d[None, :]
        q = tl.load(base + offs_q[:, None] * stride_qkv_t + offs_d[None, :], mask=q_mask,
                    other=0.0)
        do = tl.load(do_base + offs_q[:, None] * stride_do_t + offs_d[None, :], mask=q_mask,
                     other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + row_base + offs_q, mask=mask_q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_q, mask=mask_q, other=0.0)
        # Transposed scores: sT[j, i] = k_j . q_i (keys along rows).
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pT = tl.exp2(sT - lse[None, :])
        pT = tl.where(mask_q[None, :], pT, 0.0)
        pT_in = pT.to(in_dtype)
        if UPCAST:
            pT_in = pT_in.to(tl.float32)
        dv += tl.dot(pT_in, do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dsT = dsT.to(in_dtype)
        if UPCAST:
            dsT = dsT.to(tl.float32)
        dk += tl.dot(dsT, q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    d_base = DQKV + n.to(tl.int64) * stride_dqkv_n + h * HEAD_DIM
    d_off = offs_kv[:, None] * stride_dqkv_t + offs_d[None, :]
    tl.store(d_base + D + d_off, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(d_base + 2 * D + d_off, dv.to(DQKV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, DQKV,
    sm_scale, qk_scale,
    stride_qkv_n, stride_qkv_t,
    stride_do_n, stride_do_t,
    stride_dqkv_n, stride_dqkv_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query block, n*H + h): dq of that block, looping over key blocks."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_q = offs_q < T
    q_mask = mask_q[:, None] & mask_d[None, :]

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    row_base = pid_nh.to(tl.int64) * T
    q = tl.load(base + offs_q[:, None] * stride_qkv_t + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM
                 + offs_q[:, None] * stride_do_t + offs_d[None, :], mask=q_mask, other=0.0)
    in_dtype = q.dtype
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row_base + offs_q, mask=mask_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_q, mask=mask_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_kv = start_n + offs_n
        kv_mask = (offs_kv < T)[:, None] & mask_d[None, :]
        kv_off = offs_kv[:, None] * stride_qkv_t + offs_d[None, :]
        k = tl.load(base + D + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * D + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if not EVEN_N:
            p = tl.where((offs_kv < T)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(in_dtype)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQKV + n.to(tl.int64) * stride_dqkv_n + h * HEAD_DIM
             + offs_q[:, None] * stride_dqkv_t + offs_d[None, :],
             dq.to(DQKV.dtype.element_ty), mask=q_mask)


# ---- launch configuration ---------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16


def _fwd_config(dtype: torch.dtype, block_d: int) -> dict:
    """Starting points from the Triton tutorial / flash-attn's Triton port; not tuned on a GPU here."""
    if dtype == torch.float32:  # 4-byte tiles: smaller blocks to fit shared memory
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)


def _bwd_config(dtype: torch.dtype, block_d: int) -> dict:
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)


def unsupported_reason(qkv: torch.Tensor, num_heads: int) -> str | None:
    """None if the Triton kernels can run `qkv`, else why not (shape/dtype/layout only)."""
    if qkv.dtype not in SUPPORTED_DTYPES:
        return f"Triton attention supports float16/bfloat16/float32, not {qkv.dtype}"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return (f"Triton attention supports head dims {', '.join(map(str, SUPPORTED_HEAD_DIMS))}, "
                f"not {head_dim}")
    return None


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any N/T strides but need the last dim contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_fwd(qkv: torch.Tensor, num_heads: int, *, block_m: int | None = None,
                  block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (N, T, 3*D) -> (out (N, T, D) in qkv's dtype, lse (N, H, T) float32)."""
    qkv = _unit_inner(qkv)
    N, T, C = qkv.shape
    D = C // 3
    H = num_heads
    Dh = D // H
    out = torch.empty((N, T, D), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((N, H, T), device=qkv.device, dtype=torch.float32)
    if N * T * H == 0:
        return out, lse
    BD = _block_d(Dh)
    cfg = _fwd_config(qkv.dtype, BD)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    scale = 1.0 / math.sqrt(Dh)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), N * H)
    _attn_fwd_kernel[grid](
        qkv, out, lse, scale * _LOG2E,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), T, H,
        HEAD_DIM=Dh, BLOCK_D=BD, EVEN_N=(T % cfg["BLOCK_N"] == 0),
        DOT_PRECISION=_dot_precision(qkv.dtype), UPCAST=_interpreting(), **cfg)
    return out, lse


def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  num_heads: int, *, block_m: int | None = None,
                  block_n: int | None = None) -> torch.Tensor:
    """Gradient w.r.t. qkv (N, T, 3*D), qkv's dtype, given dout (N, T, D), out and lse (N, H, T)."""
    qkv, out, dout = _unit_inner(qkv), _unit_inner(out), _unit_inner(dout)
    lse = lse.contiguous()
    N, T, C = qkv.shape
    D = C // 3
    H = num_heads
    Dh = D // H
    dqkv = torch.empty((N, T, C), device=qkv.device, dtype=qkv.dtype)
    if N * T * H == 0:
        return dqkv.zero_()
    BD = _block_d(Dh)
    cfg = _bwd_config(qkv.dtype, BD)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    delta = torch.empty((N, H, T), device=qkv.device, dtype=torch.float32)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, BM), N * H)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), T, H,
        HEAD_DIM=Dh, BLOCK_D=BD, BLOCK_M=BM, num_warps=4)
    scale = 1.0 / math.sqrt(Dh)
    common = (scale, scale * _LOG2E, qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
              dqkv.stride(0), dqkv.stride(1), T, H)
    kw = dict(HEAD_DIM=Dh, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN,
              DOT_PRECISION=_dot_precision(qkv.dtype), UPCAST=_interpreting(), **cfg)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, BN), N * H)](qkv, dout, lse, delta, dqkv, *common, **kw)
    _attn_bwd_dq_kernel[(triton.cdiv(T, BM), N * H)](qkv, dout, lse, delta, dqkv, *common,
                                                     EVEN_N=(T % BN == 0), **kw)
    return dqkv


# ---- ahead-of-time compilation specs -----------------------------------------------------------

def _aot_specs() -> list:
    """(kernel, signature, constexprs) for fp16/bf16/fp32 x head dims 64/72/128, with the block
    sizes the launchers above use. Strides / sizes are i32 (as the JIT specializes them for
    DiT-sized tensors); the batch offset is widened to int64 inside the kernels."""
    specs = []
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = ptr[dtype]
        for hd in SUPPORTED_HEAD_DIMS:
            bd = _block_d(hd)
            f = _fwd_config(dtype, bd)
            b = _bwd_config(dtype, bd)
            prec = _dot_precision(dtype)
            specs.append((_attn_fwd_kernel,
                          {"QKV": p, "O": p, "LSE": "*fp32", "qk_scale": "fp32",
                           "stride_qkv_n": "i32", "stride_qkv_t": "i32", "stride_o_n": "i32",
                           "stride_o_t": "i32", "T": "i32", "H": "i32"},
                          {"HEAD_DIM": hd, "BLOCK_D": bd, "BLOCK_M": f["BLOCK_M"],
                           "BLOCK_N": f["BLOCK_N"], "EVEN_N": False, "DOT_PRECISION": prec,
                           "UPCAST": False}))
            specs.append((_attn_bwd_preprocess_kernel,
                          {"O": p, "DO": p, "DELTA": "*fp32", "stride_o_n": "i32",
                           "stride_o_t": "i32", "stride_do_n": "i32", "stride_do_t": "i32",
                           "T": "i32", "H": "i32"},
                          {"HEAD_DIM": hd, "BLOCK_D": bd, "BLOCK_M": b["BLOCK_M"]}))
            bwd_sig = {"QKV": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQKV": p,
                       "sm_scale": "fp32", "qk_scale": "fp32",
                       "stride_qkv_n": "i32", "stride_qkv_t": "i32", "stride_do_n": "i32",
                       "stride_do_t": "i32", "stride_dqkv_n": "i32", "stride_dqkv_t": "i32",
                       "T": "i32", "H": "i32"}
            bwd_const = {"HEAD_DIM": hd, "BLOCK_D": bd, "BLOCK_M": b["BLOCK_M"],
                         "BLOCK_N": b["BLOCK_N"], "DOT_PRECISION": prec, "UPCAST": False}
            specs.append((_attn_bwd_dkdv_kernel, dict(bwd_sig), dict(bwd_const)))
            specs.append((_attn_bwd_dq_kernel, dict(bwd_sig), {**bwd_const, "EVEN_N": False}))
    return specs


AOT_SPECS = _aot_specs()
