"""Triton kernels for DiT's gated residual update, alone and fused with the next LayerNorm-modulate
(dit_fast.ops.gated_residual; math as csrc/common/gated_residual.h).

    x_new = x + gate[n] * y;   h = LN(x_new) * (1 + scale[n]) + shift[n]

x, y (N, T, D) contiguous; gate/shift/scale (N, D) with unit stride along D and any row stride.
Forward: each program handles ROWS rows as a [ROWS, BLOCK_D] register tile (any D via masking),
fp32 math; the LayerNorm is taken of x_new as stored (rounded to the storage dtype), like the
unfused code.
Backward: one program per (n, chunk of tokens) writing dx, dy and per-chunk float32 partial sums of
the parameter gradients, reduced by the launcher in a fixed order (deterministic, no atomics).
Storage dtypes: float32, bfloat16, float16.
"""

import torch
import triton
import triton.language as tl

from . import _rows
from .ln_modulate import ln_modulate_tile, ln_modulate_tile_bwd
from ._launch import on_tensor_device

__all__ = ["gated_residual_ln_modulate_fwd", "gated_residual_ln_modulate_bwd",
           "gated_residual_fwd", "gated_residual_bwd", "AOT_SPECS"]


@triton.jit
def _gr_ln_modulate_fwd_kernel(X, Y, GATE, SHIFT, SCALE, XN, H, MEAN, RSTD, R, T, D, gate_rs,
                               shift_rs, scale_rs, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    n = rows // T
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + n[:, None] * gate_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xn = (x + g * y).to(XN.dtype.element_ty)
    tl.store(XN + off, xn, mask=mask)
    r = xn.to(tl.float32)  # the LayerNorm sees x_new as stored
    h, mean, rstd = ln_modulate_tile(r, mask, n, cols, SHIFT, SCALE, shift_rs, scale_rs, D, eps)
    tl.store(H + off, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _gr_ln_modulate_bwd_kernel(DXN, DH, XN, Y, GATE, SCALE, MEAN, RSTD, DX, DY, PART, T, D,
                               gate_rs, scale_rs, C, per_chunk, HAS_DXN: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (n, c): tokens [c * per_chunk, min((c + 1) * per_chunk, T)) of batch entry n.
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gt = tl.load(GATE + n * gate_rs + cols, mask=cmask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + n * scale_rs + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
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
        r = tl.load(XN + off, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        dr, xhat = ln_modulate_tile_bwd(dh, r, mask, mean, rstd, sc, D)
        if HAS_DXN:
            dr += tl.load(DXN + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dr.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + off, (gt[None, :] * dr).to(DY.dtype.element_ty), mask=mask)
        acc_gate += tl.sum(dr * y, axis=0)
        acc_shift += tl.sum(dh, axis=0)
        acc_scale += tl.sum(dh * xhat, axis=0)
    base = PART + ((n * C + c) * 3) * D
    tl.store(base + cols, acc_gate, mask=cmask)
    tl.store(base + D + cols, acc_shift, mask=cmask)
    tl.store(base + 2 * D + cols, acc_scale, mask=cmask)


@triton.jit
def _gr_fwd_kernel(X, Y, GATE, OUT, R, T, D, gate_rs, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    n = rows // T
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + n[:, None] * gate_rs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + off, (x + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gr_bwd_kernel(DOUT, Y, GATE, DY, PART, T, D, gate_rs, C, per_chunk, ROWS: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(GATE + n * gate_rs + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = c * per_chunk
    t1 = tl.minimum(t0 + per_chunk, T)
    for tb in range(t0, t1, ROWS):
        ts = tb + tl.arange(0, ROWS)
        mask = (ts < t1)[:, None] & cmask[None, :]
        off = (n * T + ts)[:, None] * D + cols[None, :]
        do = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DY + off, (g[None, :] * do).to(DY.dtype.element_ty), mask=mask)
        acc += tl.sum(do * y, axis=0)
    tl.store(PART + (n * C + c) * D + cols, acc, mask=cmask)


# ---- launchers ------------------------------------------------------------------------------

def _cfg(D: int) -> tuple[int, int, int]:
    BD = _rows.block_d(D)
    RW = _rows.rows_per_program(BD)
    return BD, RW, _rows.tile_warps(RW, BD)


@on_tensor_device
def gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, eps: float):
    """(x_new, h, mean, rstd); mean/rstd float32 (N, T)."""
    x, y = x.contiguous(), y.contiguous()
    gate, shift, scale = (_rows.unit_last(t) for t in (gate, shift, scale))
    N, T, D = x.shape
    _rows.check_block(D, "gated_residual_ln_modulate")
    x_new, h = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty((N, T), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, T), device=x.device, dtype=torch.float32)
    if N * T == 0:
        return x_new, h, mean, rstd
    if D == 0:
        return x_new, h, mean.zero_(), rstd.fill_(1.0 / (eps ** 0.5) if eps > 0 else float("inf"))
    BD, RW, nw = _cfg(D)
    _gr_ln_modulate_fwd_kernel[(triton.cdiv(N * T, RW),)](
        x, y, gate, shift, scale, x_new, h, mean, rstd, N * T, T, D, _rows.row_stride(gate, D),
        _rows.row_stride(shift, D), _rows.row_stride(scale, D), float(eps), ROWS=RW, BLOCK_D=BD,
        num_warps=nw)
    return x_new, h, mean, rstd


@on_tensor_device
def gated_residual_ln_modulate_bwd(dx_new, dh, x_new, y, gate, scale, mean, rstd):
    """(dx, dy, dgate, dshift, dscale) in x_new's dtype; dx_new may be None (zero)."""
    dh, x_new, y = dh.contiguous(), x_new.contiguous(), y.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    gate, scale = _rows.unit_last(gate), _rows.unit_last(scale)
    N, T, D = x_new.shape
    dx, dy = torch.empty_like(x_new), torch.empty_like(x_new)
    if N * T * D == 0:
        z = torch.zeros((N, D), device=x_new.device, dtype=x_new.dtype)
        return dx, dy, z, z.clone(), z.clone()
    BD, RW, nw = _cfg(D)
    C, per = _rows.token_chunks(N, T, RW)
    part = torch.empty((N, C, 3, D), device=x_new.device, dtype=torch.float32)
    has_dxn = dx_new is not None
    dxn = dx_new.contiguous() if has_dxn else dh  # dummy pointer when absent
    _gr_ln_modulate_bwd_kernel[(N, C)](
        dxn, dh, x_new, y, gate, scale, mean, rstd, dx, dy, part, T, D,
        _rows.row_stride(gate, D), _rows.row_stride(scale, D), C, per, HAS_DXN=has_dxn,
        ROWS=RW, BLOCK_D=BD, num_warps=nw)
    dgate, dshift, dscale = (part[:, :, k].sum(1).to(x_new.dtype) for k in range(3))
    return dx, dy, dgate, dshift, dscale  # separate tensors (custom-op outputs must not alias)


@on_tensor_device
def gated_residual_fwd(x, y, gate):
    x, y, gate = x.contiguous(), y.contiguous(), _rows.unit_last(gate)
    N, T, D = x.shape
    _rows.check_block(D, "gated_residual")
    out = torch.empty_like(x)
    if N * T * D == 0:
        return out
    BD, RW, nw = _cfg(D)
    _gr_fwd_kernel[(triton.cdiv(N * T, RW),)](x, y, gate, out, N * T, T, D,
                                              _rows.row_stride(gate, D), ROWS=RW, BLOCK_D=BD,
                                              num_warps=nw)
    return out


@on_tensor_device
def gated_residual_bwd(dout, y, gate):
    """(dy, dgate); dx = dout."""
    dout, y, gate = dout.contiguous(), y.contiguous(), _rows.unit_last(gate)
    N, T, D = dout.shape
    dy = torch.empty_like(dout)
    if N * T * D == 0:
        return dy, torch.zeros((N, D), device=dout.device, dtype=dout.dtype)
    BD, RW, nw = _cfg(D)
    C, per = _rows.token_chunks(N, T, RW)
    part = torch.empty((N, C, D), device=dout.device, dtype=torch.float32)
    _gr_bwd_kernel[(N, C)](dout, y, gate, dy, part, T, D, _rows.row_stride(gate, D), C, per,
                           ROWS=RW, BLOCK_D=BD, num_warps=nw)
    return dy, part.sum(1).to(dout.dtype)


# ---- ahead-of-time compilation specs ----------------------------------------------------------

def _aot_specs() -> list:
    """fp32 and bf16 at DiT-XL's D = 1152."""
    specs = []
    BD, RW, _ = _cfg(1152)
    k = {"ROWS": RW, "BLOCK_D": BD}
    for p in ("*fp32", "*bf16"):
        specs.append((_gr_ln_modulate_fwd_kernel,
                      {"X": p, "Y": p, "GATE": p, "SHIFT": p, "SCALE": p, "XN": p, "H": p,
                       "MEAN": "*fp32", "RSTD": "*fp32", "R": "i32", "T": "i32", "D": "i32",
                       "gate_rs": "i32", "shift_rs": "i32", "scale_rs": "i32", "eps": "fp32"},
                      dict(k)))
        specs.append((_gr_ln_modulate_bwd_kernel,
                      {"DXN": p, "DH": p, "XN": p, "Y": p, "GATE": p, "SCALE": p,
                       "MEAN": "*fp32", "RSTD": "*fp32", "DX": p, "DY": p, "PART": "*fp32",
                       "T": "i32", "D": "i32", "gate_rs": "i32", "scale_rs": "i32", "C": "i32",
                       "per_chunk": "i32"},
                      {"HAS_DXN": p == "*fp32", **k}))  # both branches, one per dtype
        specs.append((_gr_fwd_kernel,
                      {"X": p, "Y": p, "GATE": p, "OUT": p, "R": "i32", "T": "i32", "D": "i32",
                       "gate_rs": "i32"},
                      dict(k)))
        specs.append((_gr_bwd_kernel,
                      {"DOUT": p, "Y": p, "GATE": p, "DY": p, "PART": "*fp32", "T": "i32",
                       "D": "i32", "gate_rs": "i32", "C": "i32", "per_chunk": "i32"},
                      dict(k)))
    return specs


AOT_SPECS = _aot_specs()
