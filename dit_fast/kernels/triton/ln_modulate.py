"""Triton kernels for the fused LayerNorm (no affine) + adaLN modulation (dit_fast.ops.ln_modulate).

    y = LN(x) * (1 + scale[n]) + shift[n];  x (N, T, D), shift/scale (N, D) with any row stride.

Forward: each program normalizes ROWS rows held in registers as a [ROWS, BLOCK_D] tile (any D via
masking; BLOCK_D is the next power of two), fp32 math, mean/rstd stored as float32. Backward: one
program per (n, chunk of tokens): dx for its rows, and per-chunk partial sums of dshift / dscale
(float32) that the launcher reduces over chunks in a fixed order (deterministic, no atomics).
Storage dtypes: float32, bfloat16, float16.
"""

import torch
import triton
import triton.language as tl

from . import _rows
from ._launch import on_tensor_device

__all__ = ["ln_modulate_fwd", "ln_modulate_bwd", "ln_modulate_tile", "ln_modulate_tile_bwd", "AOT_SPECS"]


# ---- tile math shared with the gated-residual kernels (gated_residual.py) -------------------

@triton.jit
def ln_modulate_tile(x, mask, n, cols, SHIFT, SCALE, shift_rs, scale_rs, D, eps):
    """LN(x) * (1 + scale[n]) + shift[n] of a [ROWS, BLOCK_D] float32 tile (masked lanes 0):
    (out, mean, rstd)."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + n[:, None] * shift_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + n[:, None] * scale_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * (1.0 + sc) + sh, mean, rstd


@triton.jit
def ln_modulate_tile_bwd(dout, x, mask, mean, rstd, sc, D):
    """Gradient through LN-modulate for a [ROWS, BLOCK_D] float32 tile, sc the (BLOCK_D,) scale row:
    (dx, xhat)."""
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dout * (1.0 + sc[None, :])
    mean_g = tl.sum(g, axis=1) / D
    mean_gx = tl.sum(g * xhat, axis=1) / D
    return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]), xhat



@triton.jit
def _ln_modulate_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, R, T, D, shift_rs, scale_rs, eps,
                            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    n = rows // T
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = ln_modulate_tile(x, mask, n, cols, SHIFT, SCALE, shift_rs, scale_rs, D, eps)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_modulate_bwd_kernel(DY, X, SCALE, MEAN, RSTD, DX, PART, T, D, scale_rs, C, per_chunk,
                            ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (n, c): tokens [c * per_chunk, min((c + 1) * per_chunk, T)) of batch entry n.
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    sc = tl.load(SCALE + n * scale_rs + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = c * per_chunk
    t1 = tl.minimum(t0 + per_chunk, T)
    for tb in range(t0, t1, ROWS):
        ts = tb + tl.arange(0, ROWS)
        rmask = ts < t1
        rows = n * T + ts
        mask = rmask[:, None] & cmask[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        dx, xhat = ln_modulate_tile_bwd(dy, x, mask, mean, rstd, sc, D)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        acc_shift += tl.sum(dy, axis=0)
        acc_scale += tl.sum(dy * xhat, axis=0)
    base = PART + ((n * C + c) * 2) * D
    tl.store(base + cols, acc_shift, mask=cmask)
    tl.store(base + D + cols, acc_scale, mask=cmask)


@on_tensor_device
def ln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """(y, mean, rstd); x (N, T, D), shift/scale (N, D). mean/rstd float32."""
    x = x.contiguous()
    shift, scale = _rows.unit_last(shift), _rows.unit_last(scale)
    N, T, D = x.shape
    _rows.check_block(D, "ln_modulate")
    y = torch.empty_like(x)
    mean = torch.empty((N, T), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, T), device=x.device, dtype=torch.float32)
    if N * T == 0:
        return y, mean, rstd
    if D == 0:  # as the C++ kernels: mean 0, var 0
        return y, mean.zero_(), rstd.fill_(1.0 / (eps ** 0.5) if eps > 0 else float("inf"))
    BD = _rows.block_d(D)
    RW = _rows.rows_per_program(BD)
    _ln_modulate_fwd_kernel[(triton.cdiv(N * T, RW),)](
        x, shift, scale, y, mean, rstd, N * T, T, D, _rows.row_stride(shift, D),
        _rows.row_stride(scale, D), float(eps), ROWS=RW, BLOCK_D=BD,
        num_warps=_rows.tile_warps(RW, BD))
    return y, mean, rstd


@on_tensor_device
def ln_modulate_bwd(dy, x, scale, mean, rstd):
    """(dx, dshift, dscale) in x's dtype."""
    x, dy = x.contiguous(), dy.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    scale = _rows.unit_last(scale)
    N, T, D = x.shape
    dx = torch.empty_like(x)
    if N * T * D == 0:
        z = torch.zeros((N, D), device=x.device, dtype=x.dtype)
        return dx, z, z.clone()
    BD = _rows.block_d(D)
    RW = _rows.rows_per_program(BD)
    C, per = _rows.token_chunks(N, T, RW)
    part = torch.empty((N, C, 2, D), device=x.device, dtype=torch.float32)
    _ln_modulate_bwd_kernel[(N, C)](dy, x, scale, mean, rstd, dx, part, T, D,
                                    _rows.row_stride(scale, D), C, per, ROWS=RW, BLOCK_D=BD,
                                    num_warps=_rows.tile_warps(RW, BD))
    dshift, dscale = (part[:, :, k].sum(1).to(x.dtype) for k in range(2))
    return dx, dshift, dscale  # separate tensors (custom-op outputs must not alias)


# ---- ahead-of-time compilation specs ----------------------------------------------------------

def _aot_specs() -> list:
    """fp32 and bf16 at DiT-XL's D = 1152 (BLOCK_D 2048, ROWS 2)."""
    specs = []
    for p in ("*fp32", "*bf16"):
        for D in (1152,):
            BD = _rows.block_d(D)
            RW = _rows.rows_per_program(BD)
            specs.append((_ln_modulate_fwd_kernel,
                          {"X": p, "SHIFT": p, "SCALE": p, "Y": p, "MEAN": "*fp32", "RSTD": "*fp32",
                           "R": "i32", "T": "i32", "D": "i32", "shift_rs": "i32", "scale_rs": "i32",
                           "eps": "fp32"},
                          {"ROWS": RW, "BLOCK_D": BD}))
            specs.append((_ln_modulate_bwd_kernel,
                          {"DY": p, "X": p, "SCALE": p, "MEAN": "*fp32", "RSTD": "*fp32", "DX": p,
                           "PART": "*fp32", "T": "i32", "D": "i32", "scale_rs": "i32", "C": "i32",
                           "per_chunk": "i32"},
                          {"ROWS": RW, "BLOCK_D": BD}))
    return specs


AOT_SPECS = _aot_specs()
