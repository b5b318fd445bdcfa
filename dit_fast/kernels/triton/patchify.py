"""Triton kernels: DiT's patch embedding as one GEMM over patches (bias + pos_embed in the
epilogue), its backward, and unpatchify (a gather). Index math as in csrc/common/patchify.h:

    token t = gh * Wg + gw,   patch element k = (c * p + i) * p + j
    P[n*T + t, k] = x[n, c, gh*p + i, gw*p + j]
    out[n, t, d]  = (sum_k P[n*T + t, k] * weight[d, k] + bias[d]) + pos[t, d]
    img[n, c, gh*p + i, gw*p + j] = y[n, gh*Wg + gw, (i*p + j)*C + c]      (unpatchify)

The patches are gathered straight from x inside the GEMM's operand loads (no im2col buffer).
Accumulation in fp32 (tl.dot with input_precision="ieee" for fp32 operands: no TF32).
Launchers take contiguous tensors; dit_fast/ops/patchify.py validates the arguments.
"""

import torch
import triton
import triton.language as tl

from ._embed_common import cast_out, on_gpu
from ._launch import on_tensor_device


@triton.jit
def _patch_offsets(m, kk, T, C, H, W, Wg, P: tl.constexpr):
    """x offsets [BM, BK] of patch elements kk of rows m."""
    n = m // T
    t = m - n * T
    gh = t // Wg
    gw = t - gh * Wg
    c = kk // (P * P)
    ij = kk - c * (P * P)
    i = ij // P
    j = ij - i * P
    return (((n[:, None] * C + c[None, :]) * H + gh[:, None] * P + i[None, :]) * W
            + gw[:, None] * P + j[None, :])


@triton.jit
def _dot(a, b, GPU: tl.constexpr):
    if GPU:
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)
    else:  # the interpreter's bf16 dot is wrong: widen
        return tl.dot(a.to(tl.float32), b.to(tl.float32))


@triton.jit
def patch_embed_fwd_kernel(x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, M, D, K, T, C, H, W, Wg,
                           P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GPU: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    d_ok = d < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(x_ptr + _patch_offsets(m, kk, T, C, H, W, Wg, P),
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + d[None, :].to(tl.int64) * K + kk[:, None],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _dot(a, b, GPU)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        t = m % T
        acc = acc + tl.load(pos_ptr + t[:, None] * D + d[None, :],
                            mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + m[:, None] * D + d[None, :], cast_out(acc, out_ptr.dtype.element_ty, GPU),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def patch_embed_dx_kernel(dout_ptr, w_ptr, dx_ptr, M, D, K, T, C, H, W, Wg, P: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          GPU: tl.constexpr):
    """dP[M, K] = dout[M, D] @ weight[D, K], scattered into dx (N, C, H, W)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = m < M
    k_ok = kk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = tl.load(dout_ptr + m[:, None] * D + d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                    other=0.0)
        b = tl.load(w_ptr + d[:, None].to(tl.int64) * K + kk[None, :],
                    mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _dot(a, b, GPU)
    tl.store(dx_ptr + _patch_offsets(m, kk, T, C, H, W, Wg, P),
             cast_out(acc, dx_ptr.dtype.element_ty, GPU), mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def patch_embed_dw_kernel(dout_ptr, x_ptr, dw_ptr, db_ptr, M, D, K, T, C, H, W, Wg,
                          P: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          GPU: tl.constexpr):
    """dweight[D, K] = dout^T[D, M] @ P[M, K] and dbias[D] = column sums of dout; each output
    block is reduced over all rows by one program, in a fixed order (deterministic)."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = d < D
    k_ok = kk < K
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        m_ok = m < M
        g = tl.load(dout_ptr + m[None, :] * D + d[:, None], mask=d_ok[:, None] & m_ok[None, :],
                    other=0.0)  # [BLOCK_D, BLOCK_M] = dout^T
        if NEED_DW:
            p = tl.load(x_ptr + _patch_offsets(m, kk, T, C, H, W, Wg, P),
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += _dot(g, p, GPU)
        if NEED_DB:
            bacc += tl.sum(g.to(tl.float32), axis=1)
    if NEED_DW:
        tl.store(dw_ptr + d[:, None].to(tl.int64) * K + kk[None, :],
                 cast_out(acc, dw_ptr.dtype.element_ty, GPU), mask=d_ok[:, None] & k_ok[None, :])
    if NEED_DB:
        first = (tl.zeros((BLOCK_D,), dtype=tl.int32) + pid_k) == 0  # only the k-block 0 stores
        tl.store(db_ptr + d, cast_out(bacc, db_ptr.dtype.element_ty, GPU), mask=d_ok & first)


@triton.jit
def unpatchify_kernel(src_ptr, dst_ptr, total, C, Hg, Wg, P: tl.constexpr, FORWARD: tl.constexpr,
                      BLOCK: tl.constexpr):
    """FORWARD: dst = img (N, C, Hg*P, Wg*P) gathered from src = y (N, T, P*P*C).
    Otherwise: dst = dy (N, T, P*P*C) gathered from src = dimg (N, C, Hg*P, Wg*P)."""
    o = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = o < total
    Wd = Wg * P
    Hd = Hg * P
    T = Hg * Wg
    if FORWARD:
        w = o % Wd
        r = o // Wd
        h = r % Hd
        r = r // Hd
        c = r % C
        n = r // C
        gh = h // P
        gw = w // P
        src = (n * T + gh * Wg + gw) * (P * P * C) + ((h - gh * P) * P + (w - gw * P)) * C + c
    else:
        e = o % (P * P * C)
        r = o // (P * P * C)
        t = r % T
        n = r // T
        c = e % C
        ij = e // C
        i = ij // P
        j = ij - i * P
        gh = t // Wg
        gw = t - gh * Wg
        src = ((n * C + c) * Hd + gh * P + i) * Wd + gw * P + j
    v = tl.load(src_ptr + src, mask=ok)
    tl.store(dst_ptr + o, v, mask=ok)


# ---- launchers -----------------------------------------------------------------------------

def _geo(x, p):
    N, C, H, W = x.shape
    Hg, Wg = H // p, W // p
    return N, C, H, W, Hg, Wg, Hg * Wg, C * p * p


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@on_tensor_device
def patch_embed_fwd(x, weight, bias, pos, p):
    """x (N, C, H, W), weight (D, C, p, p), bias (D,) or None, pos (T, D) or None -> (N, T, D)."""
    N, C, H, W, Hg, Wg, T, K = _geo(x, p)
    D = weight.shape[0]
    M = N * T
    out = torch.empty((N, T, D), device=x.device, dtype=x.dtype)
    if M == 0 or D == 0:
        return out
    if K == 0:
        out.zero_()
        if bias is not None:
            out += bias
        if pos is not None:
            out += pos
        return out
    BM, BN, BK = 64, _pow2(D, 16, 128), _pow2(K, 16, 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(D, BN))
    patch_embed_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, pos if pos is not None else x, out,
        M, D, K, T, C, H, W, Wg, P=p, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GPU=on_gpu(x))
    return out


@on_tensor_device
def patch_embed_bwd(dout, x, weight, p, need_dx, need_dweight, need_dbias):
    """(dx, dweight, dbias); the ones not needed are empty 0-element tensors."""
    N, C, H, W, Hg, Wg, T, K = _geo(x, p)
    D = weight.shape[0]
    M = N * T
    gpu = on_gpu(x)
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    dw = torch.empty_like(weight) if need_dweight else x.new_empty((0,))
    db = x.new_empty((D,)) if need_dbias else x.new_empty((0,))
    if need_dx and x.numel():
        if D == 0:
            dx.zero_()
        else:
            BM, BK, BD = 64, _pow2(K, 16, 64), _pow2(D, 16, 64)
            grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
            patch_embed_dx_kernel[grid](dout, weight, dx, M, D, K, T, C, H, W, Wg, P=p,
                                        BLOCK_M=BM, BLOCK_K=BK, BLOCK_D=BD, GPU=gpu)
    if (need_dweight or need_dbias) and D > 0:
        if M == 0 or K == 0:
            dw.zero_()
            db.zero_()
        if M > 0 and (K > 0 or need_dbias):
            BD, BK, BM = _pow2(D, 16, 64), _pow2(K, 16, 64), 64
            grid = (triton.cdiv(D, BD), max(triton.cdiv(K, BK), 1))
            patch_embed_dw_kernel[grid](dout, x, dw if need_dweight else x,
                                        db if need_dbias else x, M, D, K, T, C, H, W, Wg, P=p,
                                        NEED_DW=need_dweight and K > 0, NEED_DB=need_dbias,
                                        BLOCK_D=BD, BLOCK_K=BK, BLOCK_M=BM, GPU=gpu)
    return dx, dw, db


@on_tensor_device
def unpatchify_fwd(y, p, out_channels, grid_h, grid_w):
    N = y.shape[0]
    img = torch.empty((N, out_channels, grid_h * p, grid_w * p), device=y.device, dtype=y.dtype)
    total = img.numel()
    if total:
        BLOCK = 1024
        unpatchify_kernel[(triton.cdiv(total, BLOCK),)](y, img, total, out_channels, grid_h,
                                                        grid_w, P=p, FORWARD=True, BLOCK=BLOCK)
    return img


@on_tensor_device
def unpatchify_bwd(dimg, p):
    N, C, H, W = dimg.shape
    Hg, Wg = H // p, W // p
    dy = torch.empty((N, Hg * Wg, p * p * C), device=dimg.device, dtype=dimg.dtype)
    total = dy.numel()
    if total:
        BLOCK = 1024
        unpatchify_kernel[(triton.cdiv(total, BLOCK),)](dimg, dy, total, C, Hg, Wg, P=p,
                                                        FORWARD=False, BLOCK=BLOCK)
    return dy


# ---- AOT specializations (compiled for sm_80 / sm_90 by tests/test_triton_aot.py) -----------

def _sig(ptrs, ints, constexprs):
    sig = {name: ty for name, ty in ptrs}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


_GEO_INTS = ("M", "D", "K", "T", "C", "H", "W", "Wg")


def _fwd_spec(dt):
    c = dict(P=2, HAS_BIAS=True, HAS_POS=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GPU=True)
    ptrs = [(n, f"*{dt}") for n in ("x_ptr", "w_ptr", "b_ptr", "pos_ptr", "out_ptr")]
    return (patch_embed_fwd_kernel, _sig(ptrs, _GEO_INTS, c), c)


def _dx_spec(dt):
    c = dict(P=2, BLOCK_M=64, BLOCK_K=16, BLOCK_D=64, GPU=True)
    ptrs = [(n, f"*{dt}") for n in ("dout_ptr", "w_ptr", "dx_ptr")]
    return (patch_embed_dx_kernel, _sig(ptrs, _GEO_INTS, c), c)


def _dw_spec(dt):
    c = dict(P=2, NEED_DW=True, NEED_DB=True, BLOCK_D=64, BLOCK_K=16, BLOCK_M=64, GPU=True)
    ptrs = [(n, f"*{dt}") for n in ("dout_ptr", "x_ptr", "dw_ptr", "db_ptr")]
    return (patch_embed_dw_kernel, _sig(ptrs, _GEO_INTS, c), c)


def _unpatchify_spec(dt, forward):
    c = dict(P=2, FORWARD=forward, BLOCK=1024)
    ptrs = [("src_ptr", f"*{dt}"), ("dst_ptr", f"*{dt}")]
    return (unpatchify_kernel, _sig(ptrs, ("total", "C", "Hg", "Wg"), c), c)


AOT_SPECS = [spec(dt) for dt in ("fp32", "bf16") for spec in (_fwd_spec, _dx_spec, _dw_spec)] + [
    _unpatchify_spec(dt, fwd) for dt in ("fp32", "bf16") for fwd in (True, False)]
