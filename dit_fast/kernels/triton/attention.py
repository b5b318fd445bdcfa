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
Grid: 1-D, (token block, n*H + h) flattened onto axis 0 (`_grid`), so any N*H fits.
Head dims: the head is split into a power-of-2 part and an optional second part (`head_split`:
72 -> 64 + 16), each matmul over the head dim runs as one or two tl.dot calls, and masking zeroes
the padding; the wrapper accepts the dims we tune and test, 64, 72 (DiT-XL) and 128
(`SUPPORTED_HEAD_DIMS`). Token counts that do not divide the block sizes are masked.
Precision: fp16 / bf16 operands go to tensor cores with fp32 accumulation (P and dS are rounded
to the input dtype before their matmuls, like flash-attn). fp32 operands use TF32 tensor cores
when PyTorch allows TF32 for fp32 matmuls, else exact "ieee" products like PyTorch's fp32 SDPA
(`_dot_precision`).

Under TRITON_INTERPRET=1 (CPU tests) the constexpr UPCAST makes every tl.dot operand fp32 (after
the same roundings to the input dtype, and to TF32 in "tf32" mode): the interpreter's dot
multiplies raw bf16 bit patterns and ignores input_precision.

`AOT_SPECS` lists every launch configuration for ahead-of-time compilation checks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._launch import on_tensor_device

__all__ = ["SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "attention_fwd", "attention_bwd",
           "unsupported_reason", "head_split", "aot_configs", "AOT_SPECS"]

SUPPORTED_HEAD_DIMS = (64, 72, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634


@triton.jit
def _program_ids(T, BLOCK: tl.constexpr):
    """(token block, n*H + h) of this program: the grid is 1-D (see `_grid`), token blocks of one
    head adjacent so that programs running together share that head's k/v (or q/dO) in L2."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(T, BLOCK)
    return pid % num_blocks, pid // num_blocks


@triton.jit
def _load_part(ptr, rows, row_mask, stride, COL0: tl.constexpr, WIDTH: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of a head's (rows, HEAD_DIM) tile; zeros past HEAD_DIM."""
    cols = COL0 + tl.arange(0, WIDTH)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :],
                   mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_part(ptr, x, rows, row_mask, stride, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _operand(x, in_dtype: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`x` as a tl.dot operand: rounded to the input dtype (P and dS, as flash-attn does). Under the
    interpreter (UPCAST) widened to fp32, and in "tf32" mode cut to TF32's 10 mantissa bits, which
    is what the tensor cores read of an fp32 operand (the interpreter's dot ignores
    input_precision; fp16/bf16 values are exact in TF32)."""
    x = x.to(in_dtype)
    if UPCAST:
        x = x.to(tl.float32)
        if DOT_PRECISION == "tf32":
            x = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 0xFFFFE000
    return x


@triton.jit
def _load_kv(base, D, rows, row_mask, stride, COL0: tl.constexpr, WIDTH: tl.constexpr,
             HEAD_DIM: tl.constexpr, in_dtype: tl.constexpr, UPCAST: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of a head's k and v tiles (at base + D, base + 2D), as tl.dot
    operands."""
    k = _operand(_load_part(base + D, rows, row_mask, stride, COL0, WIDTH, HEAD_DIM),
                 in_dtype, UPCAST, DOT_PRECISION)
    v = _operand(_load_part(base + 2 * D, rows, row_mask, stride, COL0, WIDTH, HEAD_DIM),
                 in_dtype, UPCAST, DOT_PRECISION)
    return k, v


@triton.jit
def _attn_fwd_kernel(
    QKV, O, LSE,
    qk_scale,                       # softmax scale * log2(e)
    stride_qkv_n, stride_qkv_t,     # qkv strides (elements) along N and T
    stride_o_n, stride_o_t,         # out strides along N and T
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,           # T % BLOCK_N == 0: no key masking
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_nh = _program_ids(T, BLOCK_M)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < T

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    q0 = _load_part(base, offs_m, mask_m, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM)
    in_dtype = q0.dtype
    q0 = _operand(q0, in_dtype, UPCAST, DOT_PRECISION)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        q1 = _operand(_load_part(base, offs_m, mask_m, stride_qkv_t, BLOCK_D0, BLOCK_D1, HEAD_DIM),
                      in_dtype, UPCAST, DOT_PRECISION)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        offs_kv = start_n + offs_n
        mask_kv = offs_kv < T
        k0, v0 = _load_kv(base, D, offs_kv, mask_kv, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM,
                          in_dtype, UPCAST, DOT_PRECISION)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            k1, v1 = _load_kv(base, D, offs_kv, mask_kv, stride_qkv_t, BLOCK_D0, BLOCK_D1, HEAD_DIM,
                              in_dtype, UPCAST, DOT_PRECISION)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(mask_kv[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = _operand(p, in_dtype, UPCAST, DOT_PRECISION)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    o_base = O + n.to(tl.int64) * stride_o_n + h * HEAD_DIM
    _store_part(o_base, acc0 / l_i[:, None], offs_m, mask_m, stride_o_t, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_part(o_base, acc1 / l_i[:, None], offs_m, mask_m, stride_o_t, BLOCK_D0, BLOCK_D1,
                    HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_nh.to(tl.int64) * T + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_o_n, stride_o_t, stride_do_n, stride_do_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) (no matmul: one power-of-2 BLOCK_D covers the head)."""
    pid_m, pid_nh = _program_ids(T, BLOCK_M)
    n = pid_nh // H
    h = pid_nh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    o = _load_part(O + n.to(tl.int64) * stride_o_n + h * HEAD_DIM, offs_m, mask_m, stride_o_t, 0,
                   BLOCK_D, HEAD_DIM)
    do = _load_part(DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM, offs_m, mask_m, stride_do_t,
                    0, BLOCK_D, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_nh.to(tl.int64) * T + offs_m, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, DQKV,
    sm_scale, qk_scale,             # scale, scale * log2(e)
    stride_qkv_n, stride_qkv_t,     # qkv strides; dqkv is contiguous with the same shape
    stride_do_n, stride_do_t,
    stride_dqkv_n, stride_dqkv_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (key block, n*H + h): dk and dv of that block, looping over query blocks."""
    pid_n, pid_nh = _program_ids(T, BLOCK_N)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_kv = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_kv = offs_kv < T

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    do_base = DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM
    row_base = pid_nh.to(tl.int64) * T
    k0 = _load_part(base + D, offs_kv, mask_kv, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM)
    in_dtype = k0.dtype
    k0 = _operand(k0, in_dtype, UPCAST, DOT_PRECISION)
    v0 = _operand(_load_part(base + 2 * D, offs_kv, mask_kv, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM),
                  in_dtype, UPCAST, DOT_PRECISION)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        k1 = _operand(_load_part(base + D, offs_kv, mask_kv, stride_qkv_t, BLOCK_D0, BLOCK_D1,
                                 HEAD_DIM), in_dtype, UPCAST, DOT_PRECISION)
        v1 = _operand(_load_part(base + 2 * D, offs_kv, mask_kv, stride_qkv_t, BLOCK_D0, BLOCK_D1,
                                 HEAD_DIM), in_dtype, UPCAST, DOT_PRECISION)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], tl.float32)

    for start_m in range(0, T, BLOCK_M):
        offs_q = start_m + offs_m
        mask_q = offs_q < T
        q0 = _operand(_load_part(base, offs_q, mask_q, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM),
                      in_dtype, UPCAST, DOT_PRECISION)
        do0 = _operand(_load_part(do_base, offs_q, mask_q, stride_do_t, 0, BLOCK_D0, HEAD_DIM),
                       in_dtype, UPCAST, DOT_PRECISION)
        lse = tl.load(LSE + row_base + offs_q, mask=mask_q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_q, mask=mask_q, other=0.0)
        # Transposed scores: sT[j, i] = k_j . q_i (keys along rows); dpT[j, i] = v_j . dO_i.
        sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PRECISION)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            q1 = _operand(_load_part(base, offs_q, mask_q, stride_qkv_t, BLOCK_D0, BLOCK_D1,
                                     HEAD_DIM), in_dtype, UPCAST, DOT_PRECISION)
            do1 = _operand(_load_part(do_base, offs_q, mask_q, stride_do_t, BLOCK_D0, BLOCK_D1,
                                      HEAD_DIM), in_dtype, UPCAST, DOT_PRECISION)
            sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PRECISION)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PRECISION)
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(mask_q[None, :], pT, 0.0)
        dsT = _operand(pT * (dpT - delta[None, :]), in_dtype, UPCAST, DOT_PRECISION)
        pT = _operand(pT, in_dtype, UPCAST, DOT_PRECISION)
        dv0 = tl.dot(pT, do0, dv0, input_precision=DOT_PRECISION)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            dv1 = tl.dot(pT, do1, dv1, input_precision=DOT_PRECISION)
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PRECISION)

    d_base = DQKV + n.to(tl.int64) * stride_dqkv_n + h * HEAD_DIM
    _store_part(d_base + D, dk0 * sm_scale, offs_kv, mask_kv, stride_dqkv_t, 0, BLOCK_D0, HEAD_DIM)
    _store_part(d_base + 2 * D, dv0, offs_kv, mask_kv, stride_dqkv_t, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_part(d_base + D, dk1 * sm_scale, offs_kv, mask_kv, stride_dqkv_t, BLOCK_D0,
                    BLOCK_D1, HEAD_DIM)
        _store_part(d_base + 2 * D, dv1, offs_kv, mask_kv, stride_dqkv_t, BLOCK_D0, BLOCK_D1,
                    HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, DQKV,
    sm_scale, qk_scale,
    stride_qkv_n, stride_qkv_t,
    stride_do_n, stride_do_t,
    stride_dqkv_n, stride_dqkv_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query block, n*H + h): dq of that block, looping over key blocks."""
    pid_m, pid_nh = _program_ids(T, BLOCK_M)
    n = pid_nh // H
    h = pid_nh % H
    D = H * HEAD_DIM
    offs_q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_q = offs_q < T

    base = QKV + n.to(tl.int64) * stride_qkv_n + h * HEAD_DIM
    do_base = DO + n.to(tl.int64) * stride_do_n + h * HEAD_DIM
    row_base = pid_nh.to(tl.int64) * T
    q0 = _load_part(base, offs_q, mask_q, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM)
    in_dtype = q0.dtype
    q0 = _operand(q0, in_dtype, UPCAST, DOT_PRECISION)
    do0 = _operand(_load_part(do_base, offs_q, mask_q, stride_do_t, 0, BLOCK_D0, HEAD_DIM),
                   in_dtype, UPCAST, DOT_PRECISION)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], tl.float32)
    if BLOCK_D1 > 0:
        q1 = _operand(_load_part(base, offs_q, mask_q, stride_qkv_t, BLOCK_D0, BLOCK_D1, HEAD_DIM),
                      in_dtype, UPCAST, DOT_PRECISION)
        do1 = _operand(_load_part(do_base, offs_q, mask_q, stride_do_t, BLOCK_D0, BLOCK_D1,
                                  HEAD_DIM), in_dtype, UPCAST, DOT_PRECISION)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], tl.float32)
    lse = tl.load(LSE + row_base + offs_q, mask=mask_q, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_q, mask=mask_q, other=0.0)

    for start_n in range(0, T, BLOCK_N):
        offs_kv = start_n + offs_n
        mask_kv = offs_kv < T
        k0, v0 = _load_kv(base, D, offs_kv, mask_kv, stride_qkv_t, 0, BLOCK_D0, HEAD_DIM,
                          in_dtype, UPCAST, DOT_PRECISION)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            k1, v1 = _load_kv(base, D, offs_kv, mask_kv, stride_qkv_t, BLOCK_D0, BLOCK_D1, HEAD_DIM,
                              in_dtype, UPCAST, DOT_PRECISION)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if not EVEN_N:
            p = tl.where(mask_kv[None, :], p, 0.0)
        ds = _operand(p * (dp - delta[:, None]), in_dtype, UPCAST, DOT_PRECISION)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PRECISION)
        if BLOCK_D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)

    d_base = DQKV + n.to(tl.int64) * stride_dqkv_n + h * HEAD_DIM
    _store_part(d_base, dq0 * sm_scale, offs_q, mask_q, stride_dqkv_t, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_part(d_base, dq1 * sm_scale, offs_q, mask_q, stride_dqkv_t, BLOCK_D0, BLOCK_D1,
                    HEAD_DIM)


# ---- launch configuration ---------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def head_split(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the head dim as a power-of-2 part plus an optional second part
    (0: none), each >= 16 (the smallest MMA K for 16-bit operands). 72 -> 64 + 16 (80 columns, 10%
    padding) instead of one 128-wide block (44%); FlashAttention-3 pads 72 to 96 (25%)."""
    d0 = max(16, 1 << (max(head_dim, 1).bit_length() - 1))  # largest power of 2 <= head_dim
    rest = head_dim - d0
    d1 = 0 if rest <= 0 else _block_d(rest)
    return (d0, d1) if d0 + d1 < _block_d(head_dim) else (_block_d(head_dim), 0)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. fp32: TF32 tensor cores when PyTorch allows TF32 for fp32 matmuls
    (torch.backends.cuda.matmul.allow_tf32, or float32 matmul precision "high" / "medium": the
    accuracy torch's own fp32 matmuls then have); else exact fp32 products ("ieee", CUDA cores),
    matching fp32 SDPA. fp16/bf16 operands always use tensor cores (the value is ignored)."""
    if dtype == torch.float32 and not (torch.backends.cuda.matmul.allow_tf32
                                       or torch.get_float32_matmul_precision() != "highest"):
        return "ieee"
    return "tf32"


def _fwd_config(dtype: torch.dtype, precision: str, width: int) -> dict:
    """Starting points from the Triton tutorial / flash-attn's Triton port, with 8 warps (at 4,
    ptxas spills in the sm_80 / sm_90 compiles: bench/triton_attention_aot.py reports it).
    `width` = BLOCK_D0 + BLOCK_D1."""
    if dtype == torch.float32 and precision == "ieee":  # CUDA-core FMAs on 4-byte tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if dtype == torch.float32:  # TF32 tensor cores, 4-byte tiles: half the 16-bit key block
        return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3 if width <= 80 else 2)


def _bwd_config(dtype: torch.dtype, precision: str, width: int) -> dict:
    """num_stages >= 2 everywhere: the query / key loop's loads are prefetched (cp.async / TMA).
    Tensor-core configs use 64 x 64 tiles: every matmul is wgmma-sized (M >= 64) on sm_90."""
    if dtype == torch.float32 and precision == "ieee":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


# CUDA allows 2^31 - 1 blocks along grid axis 0 but only 65,535 along axes 1 and 2.
MAX_GRID_X = 2 ** 31 - 1


def _grid(N: int, H: int, T: int, block: int) -> tuple[int]:
    """One program per (n*H + h, block of `block` tokens), flattened onto grid axis 0 (decoded by
    `_program_ids`): N*H alone reaches axis 1's limit at N = 4096 with 16 heads."""
    programs = N * H * triton.cdiv(T, block)
    if programs > MAX_GRID_X:
        raise ValueError(f"Triton attention: N*H*ceil(T/{block}) = {programs} programs exceed "
                         f"CUDA's grid limit {MAX_GRID_X} (N={N}, H={H}, T={T}); split the batch")
    return (programs,)


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


@on_tensor_device
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
    D0, D1 = head_split(Dh)
    prec = _dot_precision(qkv.dtype)
    cfg = _fwd_config(qkv.dtype, prec, D0 + D1)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    scale = 1.0 / math.sqrt(Dh)
    _attn_fwd_kernel[_grid(N, H, T, cfg["BLOCK_M"])](
        qkv, out, lse, scale * _LOG2E,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), T, H,
        HEAD_DIM=Dh, BLOCK_D0=D0, BLOCK_D1=D1, EVEN_N=(T % cfg["BLOCK_N"] == 0),
        DOT_PRECISION=prec, UPCAST=_interpreting(), **cfg)
    return out, lse


@on_tensor_device
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
    D0, D1 = head_split(Dh)
    prec = _dot_precision(qkv.dtype)
    cfg = _bwd_config(qkv.dtype, prec, D0 + D1)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    BM, BN = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    delta = torch.empty((N, H, T), device=qkv.device, dtype=torch.float32)
    _attn_bwd_preprocess_kernel[_grid(N, H, T, BM)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), T, H,
        HEAD_DIM=Dh, BLOCK_D=_block_d(Dh), BLOCK_M=BM, num_warps=4)
    scale = 1.0 / math.sqrt(Dh)
    common = (scale, scale * _LOG2E, qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1),
              dqkv.stride(0), dqkv.stride(1), T, H)
    kw = dict(HEAD_DIM=Dh, BLOCK_D0=D0, BLOCK_D1=D1, BLOCK_M=BM, BLOCK_N=BN,
              DOT_PRECISION=prec, UPCAST=_interpreting(), **cfg)
    _attn_bwd_dkdv_kernel[_grid(N, H, T, BN)](qkv, dout, lse, delta, dqkv, *common, **kw)
    _attn_bwd_dq_kernel[_grid(N, H, T, BM)](qkv, dout, lse, delta, dqkv, *common,
                                            EVEN_N=(T % BN == 0), **kw)
    return dqkv


# ---- ahead-of-time compilation specs -----------------------------------------------------------

def _precisions(dtype: torch.dtype) -> tuple[str, ...]:
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


def aot_configs() -> list[dict]:
    """Every launch configuration the wrappers above can pick: dtype x head dim x dot precision,
    with the block sizes / warps / stages of `_fwd_config` and `_bwd_config`."""
    return [dict(dtype=dtype, head_dim=hd, precision=prec, split=head_split(hd),
                 fwd=_fwd_config(dtype, prec, sum(head_split(hd))),
                 bwd=_bwd_config(dtype, prec, sum(head_split(hd))))
            for dtype in SUPPORTED_DTYPES for hd in SUPPORTED_HEAD_DIMS
            for prec in _precisions(dtype)]


def _aot_specs() -> list:
    """(kernel, signature, constexprs, options) per `aot_configs` entry. Strides / sizes are i32
    (as the JIT specializes them for DiT-sized tensors); the batch offset is widened to int64
    inside the kernels. options: num_warps / num_stages as launched."""
    specs = []
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for c in aot_configs():
        p, hd, (d0, d1), f, b = ptr[c["dtype"]], c["head_dim"], c["split"], c["fwd"], c["bwd"]
        opts = lambda cfg: {k: cfg[k] for k in ("num_warps", "num_stages")}  # noqa: E731
        specs.append((_attn_fwd_kernel,
                       {"QKV": p, "O": p, "LSE": "*fp32", "qk_scale": "fp32",
                        "stride_qkv_n": "i32", "stride_qkv_t": "i32", "stride_o_n": "i32",
                        "stride_o_t": "i32", "T": "i32", "H": "i32"},
                       {"HEAD_DIM": hd, "BLOCK_D0": d0, "BLOCK_D1": d1, "BLOCK_M": f["BLOCK_M"],
                        "BLOCK_N": f["BLOCK_N"], "EVEN_N": False,
                        "DOT_PRECISION": c["precision"], "UPCAST": False}, opts(f)))
        if c["precision"] == _precisions(c["dtype"])[0]:  # no dot: once per dtype x head dim
            specs.append((_attn_bwd_preprocess_kernel,
                          {"O": p, "DO": p, "DELTA": "*fp32", "stride_o_n": "i32",
                           "stride_o_t": "i32", "stride_do_n": "i32", "stride_do_t": "i32",
                           "T": "i32", "H": "i32"},
                          {"HEAD_DIM": hd, "BLOCK_D": _block_d(hd), "BLOCK_M": b["BLOCK_M"]},
                          {"num_warps": 4}))
        bwd_sig = {"QKV": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32", "DQKV": p,
                   "sm_scale": "fp32", "qk_scale": "fp32",
                   "stride_qkv_n": "i32", "stride_qkv_t": "i32", "stride_do_n": "i32",
                   "stride_do_t": "i32", "stride_dqkv_n": "i32", "stride_dqkv_t": "i32",
                   "T": "i32", "H": "i32"}
        bwd_const = {"HEAD_DIM": hd, "BLOCK_D0": d0, "BLOCK_D1": d1, "BLOCK_M": b["BLOCK_M"],
                     "BLOCK_N": b["BLOCK_N"], "DOT_PRECISION": c["precision"], "UPCAST": False}
        specs.append((_attn_bwd_dkdv_kernel, dict(bwd_sig), dict(bwd_const), opts(b)))
        specs.append((_attn_bwd_dq_kernel, dict(bwd_sig), {**bwd_const, "EVEN_N": False},
                      opts(b)))
    return specs


AOT_SPECS = _aot_specs()
