"""DiT's patch embedding and unpatchify as fused ops.

`patch_embed(x, weight, bias, pos_embed, patch_size)` -> (N, T, D)::

    conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed

computed as ONE GEMM over the patches (the conv has stride == kernel size, so it is a matmul of
the (N*T, C*p*p) patch matrix with the (C*p*p, D) weight), the conv bias and the positional
embedding added in the GEMM's epilogue, written straight in (N, T, D) layout. Differentiable
w.r.t. x, weight and bias (and pos_embed, which DiT freezes: its gradient is only computed when it
requires grad).

`unpatchify(x, patch_size, out_channels)` (N, T, p*p*C) -> (N, C, H, W): the official
``einsum('nhwpqc->nchpwq')``, a pure permutation (gather kernels on GPU), differentiable.

Backends: reference (PyTorch), cpu (C++/OpenMP, dit_fast._C), triton, cuda (dit_fast._C_cuda).
Structure as in dit_fast/ops/ln_modulate.py: torch.library custom ops with fake impls and
registered autograd (so torch.compile(fullgraph=True) sees single nodes), and an eager fast path
that calls the backend kernel directly when no gradient is needed.

Model wiring (dit_fast/models/dit.py)::

    # DiT.forward: replaces `self.x_embedder(x) + self.pos_embed`
    x = patch_embed(x, self.x_embedder.proj.weight, self.x_embedder.proj.bias, self.pos_embed,
                    self.patch_size)
    # DiT.unpatchify
    imgs = unpatchify(x, self.patch_size, self.out_channels)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import _backends, nvtx, validation
from ._eager import eager_inference

__all__ = ["patch_embed", "patch_embed_ref", "unpatchify", "unpatchify_ref",
           "OP_PATCH_EMBED", "OP_UNPATCHIFY"]

OP_PATCH_EMBED = "patch_embed"
OP_UNPATCHIFY = "unpatchify"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _validate_pe(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation on x built like `like` (N, C, H, W): patch 2 (1 for
    odd sizes), DiT-XL's D 1152 (the weight is not visible in `like`), small (<= 2 x C x 4 x 6)
    unless `exact`; forward (with bias and pos_embed) and backward (dx, dweight, dbias)."""
    if like.dim() != 4 or like.shape[1] == 0:  # e.g. select() given an empty probe tensor
        like = like.new_empty(2, 4, 8, 8)
    N, C, H, W = like.shape
    p = 2 if H % 2 == 0 and W % 2 == 0 else 1
    if not exact:
        N, H, W = max(1, min(N, 2)), p * max(1, min(H // p, 2)), p * max(1, min(W // p, 3))
    D, T = 1152, (H // p) * (W // p)
    x = validation.like_tensor(like, (N, C, H, W))
    w = validation.randn((D, C, p, p), like, seed=1, scale=(C * p * p) ** -0.5)
    bias, pos = validation.randn((D,), like, seed=2), validation.randn((T, D), like, seed=3)
    dout = validation.randn((N, T, D), like, seed=4)
    return validation.run_phases(OP_PATCH_EMBED, backend, [
        validation.phase("fwd", lambda b, x, w, bias, pos: _FWD[b](x, w, bias, pos, p),
                         (x, w, bias, pos), ("out",)),
        validation.phase("bwd", lambda b, dout, x, w: _BWD[b](dout, x, w, p, True, True, True),
                         (dout, x, w), ("dx", "dweight", "dbias"), kind="grad"),
    ], grad)


def _validate_unp(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation on y built like `like` (N, T, p*p*C), or like the
    image gradient (N, C, H, W) the backward selects on: patch 2 where
    the last dim allows (else 1), a 2 x 3 token grid unless `exact` (then like's square grid, or
    1 x T); forward and backward (pure data movement: exact)."""
    if like.dim() == 4:  # the backward selects on the image gradient (N, C, H, W)
        N, c, H, W = like.shape
        p = 2 if H % 2 == 0 and W % 2 == 0 else 1
        T, L = (H // p) * (W // p), p * p * c
        like = like.new_empty(N, T, L)
    elif like.dim() != 3 or like.shape[-1] == 0:  # e.g. select() given an empty probe tensor
        like = like.new_empty(2, 6, 16)
    N, T, L = like.shape
    p = 2 if L % 4 == 0 else 1
    c = L // (p * p)
    gh = math.isqrt(T) if exact and math.isqrt(T) ** 2 == T else 1 if exact else 2
    gw = T // gh if exact else 3
    N = N if exact else max(1, min(N, 2))
    y = validation.like_tensor(like, (N, gh * gw, L))
    dimg = validation.randn((N, c, gh * p, gw * p), like, seed=1)
    return validation.run_phases(OP_UNPATCHIFY, backend, [
        validation.phase("fwd", lambda b, y: _UNP_FWD[b](y, p, c, gh, gw), (y,), ("img",)),
        validation.phase("bwd", lambda b, d: _UNP_BWD[b](d, p), (dimg,), ("dy",), kind="grad"),
    ], grad)


_backends.register_op(OP_PATCH_EMBED, {"reference": None, "cpu": _CPU_DTYPES,
                                       "triton": _TRITON_DTYPES, "cuda": _CUDA_DTYPES},
                      validate=_validate_pe,
                      examples=lambda device, dtype: [  # DiT-XL/2's 32x32 latents, an odd size
                          torch.empty(2, 4, 32, 32, device=device, dtype=dtype),
                          torch.empty(1, 3, 6, 10, device=device, dtype=dtype)])
# unpatchify only moves elements: any dtype of 2, 4 or 8 bytes on every backend.
_MOVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_backends.register_op(OP_UNPATCHIFY, {"reference": None, "cpu": _MOVE_DTYPES,
                                      "triton": _MOVE_DTYPES, "cuda": _MOVE_DTYPES},
                      validate=_validate_unp,
                      examples=lambda device, dtype: [  # DiT-XL/2's final tokens, an odd grid
                          torch.empty(2, 256, 32, device=device, dtype=dtype),
                          torch.empty(1, 15, 27, device=device, dtype=dtype)])


# ---- ground truth ---------------------------------------------------------------------------

def patch_embed_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                    patch_size: int) -> Tensor:
    """Reference: ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed``."""
    out = F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    return out if pos_embed is None else out + pos_embed


def unpatchify_ref(x: Tensor, patch_size: int, out_channels: int) -> Tensor:
    """Reference: the official DiT.unpatchify (square grid)."""
    c, p = out_channels, patch_size
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


# ---- validation -----------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_tensor(fn: str, name: str, t, ref: Optional[Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise ValueError(f"{fn}: {name} must have the same dtype as x ({ref.dtype}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{fn}: {name} must be on the same device as x ({ref.device}), "
                             f"got {t.device}")


def _check_patch_embed(x, weight, bias, pos_embed, patch_size):
    fn = "patch_embed"
    _check_tensor(fn, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    if not _is_int(patch_size) or patch_size <= 0:
        raise ValueError(f"{fn}: patch_size must be a positive int, got {patch_size!r}")
    N, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"{fn}: x's spatial size {H}x{W} must be divisible by patch_size {p}")
    _check_tensor(fn, "weight", weight, x)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (C, p, p):
        raise ValueError(f"{fn}: weight must have shape (D, {C}, {p}, {p}) for x with {C} channels "
                         f"and patch_size {p}, got {tuple(weight.shape)}")
    D = weight.shape[0]
    if bias is not None:
        _check_tensor(fn, "bias", bias, x)
        if tuple(bias.shape) != (D,):
            raise ValueError(f"{fn}: bias must have shape ({D},), got {tuple(bias.shape)}")
    T = (H // p) * (W // p)
    if pos_embed is not None:
        _check_tensor(fn, "pos_embed", pos_embed, x)
        if tuple(pos_embed.shape) not in ((1, T, D), (T, D)):
            raise ValueError(f"{fn}: pos_embed must have shape (1, {T}, {D}) or ({T}, {D}), got "
                             f"{tuple(pos_embed.shape)}")


def _check_unpatchify(x, patch_size, out_channels, grid):
    fn = "unpatchify"
    _check_tensor(fn, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be 3-D (N, T, patch_size**2 * out_channels), got shape "
                         f"{tuple(x.shape)}")
    if not _is_int(patch_size) or patch_size <= 0:
        raise ValueError(f"{fn}: patch_size must be a positive int, got {patch_size!r}")
    if not _is_int(out_channels) or out_channels <= 0:
        raise ValueError(f"{fn}: out_channels must be a positive int, got {out_channels!r}")
    if x.shape[2] != patch_size * patch_size * out_channels:
        raise ValueError(f"{fn}: x's last dimension must be patch_size**2 * out_channels = "
                         f"{patch_size * patch_size * out_channels}, got {x.shape[2]}")
    T = x.shape[1]
    if grid is None:
        h = math.isqrt(T)
        if h * h != T:
            raise ValueError(f"{fn}: x has {T} tokens, not a square grid; pass grid=(h, w)")
        return h, h
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(_is_int(g) and g >= 0
                                                                         for g in grid)):
        raise ValueError(f"{fn}: grid must be a pair of non-negative ints (h, w), got {grid!r}")
    if grid[0] * grid[1] != T:
        raise ValueError(f"{fn}: grid {tuple(grid)} has {grid[0] * grid[1]} cells but x has {T} tokens")
    return int(grid[0]), int(grid[1])


# ---- backend kernels --------------------------------------------------------------------------
# patch embedding: (x, weight, bias, pos2d, p) -> out (N, T, D) contiguous
#                  (dout, x, weight, p, need_dx, need_dw, need_db) -> (dx, dw, db), unneeded: empty

def _patches(x: Tensor, p: int) -> Tensor:
    """(N*T, C*p*p) patch matrix (k = (c*p + i)*p + j, the conv weight's order)."""
    N, C, H, W = x.shape
    Hg, Wg = H // p, W // p
    return x.reshape(N, C, Hg, p, Wg, p).permute(0, 2, 4, 1, 3, 5).reshape(N * Hg * Wg, C * p * p)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Math dtype of the kernels: float64 for float64 data, float32 otherwise (one final rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_reference(x, weight, bias, pos, p):
    if x.dtype in (torch.float32, torch.float64):
        # The official expression (PatchEmbed's conv, then + pos_embed): bit-identical to it.
        out = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)
        return (out if pos is None else out + pos).contiguous()
    # bf16/fp16: the GEMM over patches in fp32, one rounding at the end.
    N, C, H, W = x.shape
    D = weight.shape[0]
    T = (H // p) * (W // p)
    a = _acc(x.dtype)
    out = _patches(x.to(a), p) @ weight.to(a).reshape(D, -1).t()
    if bias is not None:
        out = out + bias.to(a)
    out = out.view(N, T, D)
    if pos is not None:
        out = out + pos.to(a)
    return out.to(x.dtype)


def _bwd_reference(dout, x, weight, p, need_dx, need_dw, need_db):
    N, C, H, W = x.shape
    D = weight.shape[0]
    Hg, Wg = H // p, W // p
    a = _acc(x.dtype)
    g = dout.to(a).reshape(N * Hg * Wg, D)
    dx, dw, db = (x.new_empty((0,)) for _ in range(3))  # distinct tensors: outputs may not alias
    if need_dx:
        dp = g @ weight.to(a).reshape(D, -1)
        dx = (dp.view(N, Hg, Wg, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(N, C, H, W)
              .to(x.dtype).contiguous())
    if need_dw:
        dw = (g.t() @ _patches(x.to(a), p)).view(weight.shape).to(x.dtype).contiguous()
    if need_db:
        db = g.sum(0).to(x.dtype)
    return dx, dw, db


def _fwd_native(x, weight, bias, pos, p):
    return torch.ops.dit_fast.patch_embed_fwd(x.contiguous(), weight.contiguous(),
                                              None if bias is None else bias.contiguous(),
                                              None if pos is None else pos.contiguous(), p)


def _bwd_native(dout, x, weight, p, need_dx, need_dw, need_db):
    return torch.ops.dit_fast.patch_embed_bwd(dout.contiguous(), x.contiguous(),
                                              weight.contiguous(), p, need_dx, need_dw, need_db)


def _fwd_triton(x, weight, bias, pos, p):
    from ..kernels.triton import patchify as K
    return K.patch_embed_fwd(x.contiguous(), weight.contiguous(),
                             None if bias is None else bias.contiguous(),
                             None if pos is None else pos.contiguous(), p)


def _bwd_triton(dout, x, weight, p, need_dx, need_dw, need_db):
    from ..kernels.triton import patchify as K
    return K.patch_embed_bwd(dout.contiguous(), x.contiguous(), weight.contiguous(), p,
                             need_dx, need_dw, need_db)


_FWD: dict[str, Callable] = {"reference": _fwd_reference, "cpu": _fwd_native,
                             "triton": _fwd_triton, "cuda": _fwd_native}
_BWD: dict[str, Callable] = {"reference": _bwd_reference, "cpu": _bwd_native,
                             "triton": _bwd_triton, "cuda": _bwd_native}


def _pe_forward(x, weight, bias, pos, p):
    return _FWD[_backends.select(OP_PATCH_EMBED, x)](x, weight, bias, pos, p)


# unpatchify: (y, p, c, gh, gw) -> img;  (dimg, p) -> dy

def _unp_fwd_reference(y, p, c, gh, gw):
    N = y.shape[0]
    return (y.reshape(N, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
            .reshape(N, c, gh * p, gw * p).contiguous())


def _unp_bwd_reference(dimg, p):
    N, c, H, W = dimg.shape
    gh, gw = H // p, W // p
    return (dimg.reshape(N, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
            .reshape(N, gh * gw, p * p * c).contiguous())


def _unp_fwd_native(y, p, c, gh, gw):
    return torch.ops.dit_fast.unpatchify_fwd(y.contiguous(), p, c, gh, gw)


def _unp_bwd_native(dimg, p):
    return torch.ops.dit_fast.unpatchify_bwd(dimg.contiguous(), p)


def _unp_fwd_triton(y, p, c, gh, gw):
    from ..kernels.triton import patchify as K
    return K.unpatchify_fwd(y.contiguous(), p, c, gh, gw)


def _unp_bwd_triton(dimg, p):
    from ..kernels.triton import patchify as K
    return K.unpatchify_bwd(dimg.contiguous(), p)


_UNP_FWD: dict[str, Callable] = {"reference": _unp_fwd_reference, "cpu": _unp_fwd_native,
                                 "triton": _unp_fwd_triton, "cuda": _unp_fwd_native}
_UNP_BWD: dict[str, Callable] = {"reference": _unp_bwd_reference, "cpu": _unp_bwd_native,
                                 "triton": _unp_bwd_triton, "cuda": _unp_bwd_native}


# ---- custom ops -----------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::patch_embed", mutates_args=())
def _patch_embed_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos: Optional[Tensor],
                    patch_size: int) -> Tensor:
    return _pe_forward(x, weight, bias, pos, patch_size)


def _pe_fake(x, weight, bias, pos, patch_size):
    N, _, H, W = x.shape
    return x.new_empty((N, (H // patch_size) * (W // patch_size), weight.shape[0]))


_patch_embed_op.register_fake(_pe_fake)


@torch.library.custom_op("dit_fast::patch_embed_backward", mutates_args=())
def _patch_embed_backward_op(dout: Tensor, x: Tensor, weight: Tensor, patch_size: int,
                             need_dx: bool, need_dweight: bool,
                             need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _BWD[_backends.select(OP_PATCH_EMBED, x)](dout, x, weight, patch_size, need_dx,
                                                     need_dweight, need_dbias)


def _pe_bwd_fake(dout, x, weight, patch_size, need_dx, need_dweight, need_dbias):
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(weight.shape if need_dweight else (0,)),
            x.new_empty((weight.shape[0],) if need_dbias else (0,)))


_patch_embed_backward_op.register_fake(_pe_bwd_fake)


def _pe_setup_context(ctx, inputs, output):
    x, weight, bias, pos, p = inputs
    ctx.save_for_backward(x, weight)
    ctx.p = p
    ctx.has_bias = bias is not None
    ctx.has_pos = pos is not None
    ctx.pos_shape = None if pos is None else pos.shape


def _pe_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dpos = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.has_bias
    dx = dw = db = dpos = None
    if need_dx or need_dw or need_db:
        gx, gw, gb = _patch_embed_backward_op(dout, x, weight, ctx.p, need_dx, need_dw, need_db)
        dx = gx if need_dx else None
        dw = gw if need_dw else None
        db = gb if need_db else None
    if need_dpos and ctx.has_pos:  # DiT freezes pos_embed; computed only if asked for
        dpos = dout.sum(0).reshape(ctx.pos_shape)
    return dx, dw, db, dpos, None


_patch_embed_op.register_autograd(_pe_backward, setup_context=_pe_setup_context)


@torch.library.custom_op("dit_fast::unpatchify", mutates_args=())
def _unpatchify_op(y: Tensor, patch_size: int, out_channels: int, grid_h: int,
                   grid_w: int) -> Tensor:
    return _UNP_FWD[_backends.select(OP_UNPATCHIFY, y)](y, patch_size, out_channels, grid_h, grid_w)


@_unpatchify_op.register_fake
def _(y, patch_size, out_channels, grid_h, grid_w):
    return y.new_empty((y.shape[0], out_channels, grid_h * patch_size, grid_w * patch_size))


@torch.library.custom_op("dit_fast::unpatchify_backward", mutates_args=())
def _unpatchify_backward_op(dimg: Tensor, patch_size: int) -> Tensor:
    return _UNP_BWD[_backends.select(OP_UNPATCHIFY, dimg)](dimg, patch_size)


@_unpatchify_backward_op.register_fake
def _(dimg, patch_size):
    N, c, H, W = dimg.shape
    return dimg.new_empty((N, (H // patch_size) * (W // patch_size), patch_size * patch_size * c))


def _unp_setup_context(ctx, inputs, output):
    ctx.p = inputs[1]


def _unp_backward(ctx, dimg):
    return _unpatchify_backward_op(dimg, ctx.p), None, None, None, None


_unpatchify_op.register_autograd(_unp_backward, setup_context=_unp_setup_context)


# FlopCounterMode does not look inside custom ops: the patch-embedding GEMM is counted through these
# formulas, as torch counts the conv it replaces (2 FLOPs per multiply-accumulate; the backward
# counts one GEMM for dx and one for dweight, each as large as the forward's).
def _patch_embed_macs(x_shape, w_shape, patch_size: int) -> int:
    N, C, H, W = x_shape
    return N * (H // patch_size) * (W // patch_size) * w_shape[0] * C * patch_size * patch_size


@register_flop_formula(torch.ops.dit_fast.patch_embed)
def _patch_embed_flops(x_shape, w_shape, bias_shape, pos_shape, patch_size, *args, out_shape=None,
                       **kwargs) -> int:
    return 2 * _patch_embed_macs(x_shape, w_shape, patch_size)


@register_flop_formula(torch.ops.dit_fast.patch_embed_backward)
def _patch_embed_backward_flops(dout_shape, x_shape, w_shape, patch_size, need_dx, need_dweight,
                                need_dbias, *args, out_shape=None, **kwargs) -> int:
    return 2 * _patch_embed_macs(x_shape, w_shape, patch_size) * (int(need_dx) + int(need_dweight))


def _register_native_fakes() -> None:
    """Fake kernels for the C++ ops, so they can be traced / opcheck'ed directly too."""
    if _backends._probe("cpu") is not None:
        return

    @torch.library.register_fake("dit_fast::patch_embed_fwd")
    def _(x, weight, bias, pos, patch_size):
        return _pe_fake(x, weight, bias, pos, patch_size)

    @torch.library.register_fake("dit_fast::patch_embed_bwd")
    def _(dout, x, weight, patch_size, need_dx, need_dweight, need_dbias):
        return _pe_bwd_fake(dout, x, weight, patch_size, need_dx, need_dweight, need_dbias)

    @torch.library.register_fake("dit_fast::unpatchify_fwd")
    def _(y, patch_size, out_channels, grid_h, grid_w):
        return y.new_empty((y.shape[0], out_channels, grid_h * patch_size, grid_w * patch_size))

    @torch.library.register_fake("dit_fast::unpatchify_bwd")
    def _(dimg, patch_size):
        N, c, H, W = dimg.shape
        return dimg.new_empty((N, (H // patch_size) * (W // patch_size),
                               patch_size * patch_size * c))


_register_native_fakes()


# ---- public API -----------------------------------------------------------------------------

@nvtx.annotate("dit_fast.patch_embed")
def patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Optional[Tensor],
                patch_size: int) -> Tensor:
    """DiT's patch embedding plus positional embedding, as one GEMM with a fused epilogue.

    x: (N, C, H, W); weight: (D, C, p, p) (PatchEmbed.proj.weight); bias: (D,) or None;
    pos_embed: (1, T, D) or (T, D) or None, T = (H/p)(W/p); all the same dtype and device.
    Returns (N, T, D) = ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2) +
    pos_embed``, contiguous. Differentiable w.r.t. x, weight, bias (and pos_embed if it requires
    grad); works under torch.compile(fullgraph=True). Raises ValueError for malformed inputs.
    """
    _check_patch_embed(x, weight, bias, pos_embed, patch_size)
    pos = None
    if pos_embed is not None:
        pos = pos_embed.reshape(pos_embed.shape[-2], pos_embed.shape[-1])
    if eager_inference(x, weight, bias, pos_embed):
        return _pe_forward(x, weight, bias, pos, patch_size)
    return _patch_embed_op(x, weight, bias, pos, patch_size)


@nvtx.annotate("dit_fast.unpatchify")
def unpatchify(x: Tensor, patch_size: int, out_channels: int, grid=None) -> Tensor:
    """(N, T, p*p*C) -> (N, C, h*p, w*p), the official DiT.unpatchify
    (``einsum('nhwpqc->nchpwq')``). grid: (h, w) token grid; default: square (h = w = sqrt(T)).
    Differentiable; works under torch.compile(fullgraph=True). Raises ValueError for malformed
    inputs."""
    gh, gw = _check_unpatchify(x, patch_size, out_channels, grid)
    if eager_inference(x):
        return _UNP_FWD[_backends.select(OP_UNPATCHIFY, x)](x, patch_size, out_channels, gh, gw)
    return _unpatchify_op(x, patch_size, out_channels, gh, gw)
