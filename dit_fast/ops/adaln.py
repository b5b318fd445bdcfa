"""Conditioning ops of DiT: the adaLN projections of all blocks as one batched GEMM, and the fused
sinusoidal timestep embedding.

(a) `AdaLNPack`: every DiT block computes ``adaLN_modulation(c) = Linear(SiLU(c))`` from the same
    c (N, D). Stacking the blocks' weights (depth*6D, D) turns depth small GEMMs (and depth SiLUs)
    into one ``SiLU(c) @ W_all^T + b_all``; each block gets an (N, 6D) view of the result (row
    stride depth*6D, unit stride along 6D, which ln_modulate reads in place). The stacked weight
    is cached and rebuilt only when a source parameter changed (its data_ptr, `_version`, dtype
    or shape); gradients flow back to every block's own weight and bias. The GEMM runs on the
    vendor BLAS (cuBLAS / oneDNN / MKL) through torch on every backend: a hand-written kernel would
    not beat it, and SiLU(c) is a tiny (N, D) elementwise op.

(b) `timestep_embedding(t, dim=256, max_period=10000)`: ``TimestepEmbedder.timestep_embedding``
    in one kernel: [cos(t * freqs), sin(t * freqs)] (+ a zero column for odd dim), float32 math
    exactly as the official code (the frequency table is computed once per (dim, max_period,
    device) with the official PyTorch expression and cached; the kernel does the float32 product
    and cos/sin). `dtype=` writes the embedding directly in the model dtype (the `.to(dtype)` that
    feeds the first MLP GEMM, fused).

Model wiring (dit_fast/models/dit.py)::

    # DiT.__init__, after the blocks and final layer are built (not an nn.Module: no state_dict
    # keys are added):
    self._adaln = AdaLNPack([b.adaLN_modulation[1] for b in self.blocks]
                            + [self.final_layer.adaLN_modulation[1]])
    # DiT.forward, with c = t + y:
    mods = self._adaln(c)                 # list: (N, 6D) per block, then (N, 2D) for the final layer
    for block, mod in zip(self.blocks, mods):
        x = block(x, c, mod)              # block uses mod.chunk(6, dim=1) instead of adaLN_modulation(c)
    # TimestepEmbedder.forward:
    t_freq = timestep_embedding(t, self.frequency_embedding_size, dtype=self.mlp[0].weight.dtype)
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import _backends, nvtx, validation
from ._eager import eager_inference

__all__ = ["AdaLNPack", "adaln_modulation", "adaln_modulation_ref", "timestep_embedding",
           "timestep_embedding_ref", "OP_TIMESTEP_EMBEDDING"]

OP_TIMESTEP_EMBEDDING = "timestep_embedding"


def _validate_te(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation: the embedding in `like`'s dtype (the output dtype)
    for dims 256 and 33 (odd) and fractional timesteps up to 999. Ground truth: the official
    float32 math (the op's definition; float64 output is held to float32's tolerance)."""
    n = like.shape[0] if exact and like.dim() == 1 and like.shape[0] else 5
    t = torch.linspace(0, 999, n, dtype=torch.float32, device=like.device) + 0.25
    checks = []
    for dim in (256, 33):
        freqs = _freqs(dim, 10000, like.device)
        checks += validation.run_phases(OP_TIMESTEP_EMBEDDING, backend, [validation.phase(
            f"fwd dim {dim}", lambda b, t: _TE[b](t, freqs, dim, like.dtype), (t,), ("emb",),
            truth=lambda got: (_te_reference(t, freqs, dim, torch.float64),),
            tol_dtype=torch.float32 if like.dtype == torch.float64 else like.dtype)],
            grad, dtype=like.dtype)
    return checks


# Keyed by the *output* dtype (the math is float32 in every case).
_backends.register_op(OP_TIMESTEP_EMBEDDING, {
    "reference": None,
    "cpu": (torch.float32, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}, validate=_validate_te,
    examples=lambda device, dtype: [torch.empty(256, device=device, dtype=dtype)])
_T_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


# =============================================================================================
# (b) timestep embedding
# =============================================================================================

def timestep_embedding_ref(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Reference: the official ``TimestepEmbedder.timestep_embedding`` (float32 (N, dim))."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


_FREQS: Dict[Tuple[int, float, torch.device], Tensor] = {}


def _freqs(dim: int, max_period: float, device: torch.device) -> Tensor:
    """The official float32 frequency table (dim // 2,), computed by PyTorch on `device`."""
    key = (dim, float(max_period), device)
    f = _FREQS.get(key)
    if f is None:
        half = dim // 2
        f = torch.exp(-math.log(max_period)
                      * torch.arange(start=0, end=half, dtype=torch.float32, device=device) / half)
        _FREQS[key] = f
    return f


def _te_reference(t: Tensor, freqs: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(dtype)


def _te_native(t, freqs, dim, dtype):
    return torch.ops.dit_fast.timestep_embedding_fwd(t, freqs, dim, dtype)


def _te_triton(t, freqs, dim, dtype):
    from ..kernels.triton import adaln as K
    return K.timestep_embedding(t, freqs, dim, dtype)


_TE: Dict[str, Callable] = {"reference": _te_reference, "cpu": _te_native, "triton": _te_triton,
                            "cuda": _te_native}


def _te_forward(t, freqs, dim, dtype):
    return _TE[_backends.select(OP_TIMESTEP_EMBEDDING, torch.empty(0, dtype=dtype, device=t.device)
                                )](t, freqs, dim, dtype)


@torch.library.custom_op("dit_fast::timestep_embedding", mutates_args=())
def _timestep_embedding_op(t: Tensor, freqs: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    return _te_forward(t, freqs, dim, dtype)


@_timestep_embedding_op.register_fake
def _(t, freqs, dim, dtype):
    return t.new_empty((t.shape[0], dim), dtype=dtype)


def _te_setup_context(ctx, inputs, output):
    t, freqs, dim, _dtype = inputs
    ctx.save_for_backward(t, freqs)
    ctx.dim = dim


def _te_backward(ctx, g):
    # d/dt [cos(t f), sin(t f)] = [-f sin(t f), f cos(t f)] (only for float t that requires grad)
    t, freqs = ctx.saved_tensors
    half = freqs.shape[0]
    args = t[:, None].float() * freqs[None]
    g = g.float()
    dt = ((-freqs * torch.sin(args) * g[:, :half]).sum(1)
          + (freqs * torch.cos(args) * g[:, half:2 * half]).sum(1))
    return dt.to(t.dtype), None, None, None


_timestep_embedding_op.register_autograd(_te_backward, setup_context=_te_setup_context)


def _register_native_fakes() -> None:
    if _backends._probe("cpu") is not None:
        return

    @torch.library.register_fake("dit_fast::timestep_embedding_fwd")
    def _(t, freqs, dim, dtype):
        return t.new_empty((t.shape[0], dim), dtype=dtype)


_register_native_fakes()


@nvtx.annotate("dit_fast.timestep_embedding")
def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal timestep embedding, (N,) -> (N, dim), equal to the official
    ``TimestepEmbedder.timestep_embedding(t, dim, max_period)`` (float32 math) cast to `dtype`.

    t: 1-D float or int tensor (fractional timesteps allowed). dtype: output dtype (float32,
    bfloat16, float16, float64): the model dtype, fusing the cast before the first MLP GEMM.
    Raises ValueError for malformed inputs.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"timestep_embedding: t must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be 1-D (N,), got shape {tuple(t.shape)}")
    if t.dtype not in _T_DTYPES:
        raise ValueError(f"timestep_embedding: t must be float32/float64/int32/int64, got {t.dtype}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
        # (dim = 1 has no frequencies; the official code returns an (N, 0) tensor there)
        raise ValueError(f"timestep_embedding: dim must be an int >= 2, got {dim!r}")
    if not isinstance(max_period, (int, float)) or isinstance(max_period, bool) or not max_period > 0:
        raise ValueError(f"timestep_embedding: max_period must be a positive number, got {max_period!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"timestep_embedding: dtype must be a floating-point torch.dtype, got {dtype!r}")
    freqs = _freqs(dim, max_period, t.device)
    if eager_inference(t):
        return _te_forward(t, freqs, dim, dtype)
    return _timestep_embedding_op(t, freqs, dim, dtype)


# =============================================================================================
# (a) the adaLN projections of all blocks as one GEMM
# =============================================================================================

def adaln_modulation_ref(c: Tensor, linears: Sequence[nn.Linear]) -> List[Tensor]:
    """Reference: each block's own ``Linear(SiLU(c))``."""
    s = F.silu(c)
    return [lin(s) for lin in linears]


def adaln_modulation(c: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``SiLU(c) @ weight^T + bias`` for a stacked weight (sum of out_features, D)."""
    return F.linear(F.silu(c), weight, bias)


class _Alias(torch.autograd.Function):
    """Returns `pack` (which aliases the storage of `params`) as a differentiable function of
    `params`: backward splits the gradient into one view per parameter."""

    @staticmethod
    def forward(ctx, pack, sizes, *params):
        ctx.sizes = sizes
        ctx.shapes = [p.shape for p in params]
        return pack.view_as(pack)

    @staticmethod
    def backward(ctx, grad):
        parts = grad.split(ctx.sizes, dim=0)
        return (None, None) + tuple(g.view(s) for g, s in zip(parts, ctx.shapes))


class AdaLNPack:
    """All adaLN projections that share the conditioning input, computed as ONE GEMM.

    ``pack = AdaLNPack([blk.adaLN_modulation[1] for blk in model.blocks] + [...])`` then
    ``pack(c)`` returns ``[lin(SiLU(c)) for lin in linears]`` as views of one (N, sum(out)) GEMM
    output. Not an nn.Module (holding it on a model adds no state_dict keys); the layers' own
    parameters stay the source of truth.

    Caching: the stacked weight/bias are rebuilt only when a parameter changed (data_ptr,
    `_version` counter, dtype, device or shape; `.to()`, `load_state_dict`, optimizer steps and
    in-place edits are detected; writes through ``param.data`` are not: call `invalidate()`).

    share_storage=True: after stacking, every parameter is re-pointed (``param.data = view``) into
    the stacked buffer, so the pack costs no extra memory and never needs a rebuild after in-place
    updates (training: optimizer steps write the pack directly). The parameters then share one
    storage; state_dict keys and values are unchanged, but tools that refuse shared storage
    (safetensors) need ``{k: v.clone() ...}``. Off by default.

    Gradients: with grad enabled and a parameter requiring grad, copy mode stacks with torch.cat
    (autograd splits the gradient back); share mode uses the aliased buffer directly. Under
    torch.compile the stacked weight is built with torch.cat inside the graph (no cache checks).
    """

    def __init__(self, linears: Sequence[nn.Linear], share_storage: bool = False):
        linears = list(linears)
        if not linears:
            raise ValueError("AdaLNPack: linears must contain at least one nn.Linear")
        for i, lin in enumerate(linears):
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"AdaLNPack: linears[{i}] must be an nn.Linear, got {type(lin).__name__}")
            if lin.in_features != linears[0].in_features:
                raise ValueError(f"AdaLNPack: linears[{i}] has in_features={lin.in_features}, expected "
                                 f"{linears[0].in_features} (all layers must read the same c)")
            if (lin.bias is None) != (linears[0].bias is None):
                raise ValueError(f"AdaLNPack: linears[{i}] must have a bias iff linears[0] has one")
        self.linears = linears
        self.share_storage = bool(share_storage)
        self.sizes = [lin.out_features for lin in linears]
        self.invalidate()

    # -- cache ---------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Drops the cached stacked weight (rebuilt at the next call)."""
        self._w: Optional[Tensor] = None
        self._b: Optional[Tensor] = None
        self._key: Optional[tuple] = None

    def __getstate__(self):  # pickling / deepcopy (e.g. an EMA copy of the model): no cache
        state = self.__dict__.copy()
        state.update(_w=None, _b=None, _key=None)
        return state

    def _params(self) -> List[Tensor]:
        ps = [lin.weight for lin in self.linears]
        if self.linears[0].bias is not None:
            ps += [lin.bias for lin in self.linears]
        return ps

    def _current_key(self) -> tuple:
        if self.share_storage:  # aliased params: only their location matters
            return tuple((p.data_ptr(), p.dtype, p.device, tuple(p.shape)) for p in self._params())
        return tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                     for p in self._params())

    def _check_params(self) -> None:
        w0 = self.linears[0].weight
        for i, lin in enumerate(self.linears):
            for name, p in (("weight", lin.weight), ("bias", lin.bias)):
                if p is None:
                    continue
                if p.dtype != w0.dtype or p.device != w0.device:
                    raise ValueError(f"AdaLNPack: linears[{i}].{name} is {p.dtype} on {p.device}, "
                                     f"expected {w0.dtype} on {w0.device} (all layers must match)")

    @torch.no_grad()
    def _rebuild(self) -> None:
        self._check_params()
        w = torch.cat([lin.weight for lin in self.linears], dim=0)
        b = (torch.cat([lin.bias for lin in self.linears], dim=0)
             if self.linears[0].bias is not None else None)
        if self.share_storage:
            for lin, wv in zip(self.linears, w.split(self.sizes, dim=0)):
                lin.weight.data = wv
            if b is not None:
                for lin, bv in zip(self.linears, b.split(self.sizes, dim=0)):
                    lin.bias.data = bv
        self._w, self._b = w, b
        self._key = self._current_key()

    def stacked(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The current (weight (sum(out), D), bias (sum(out),) or None), rebuilt if stale.
        Not differentiable (see `__call__`)."""
        if self._w is None or self._key != self._current_key():
            self._rebuild()
        return self._w, self._b

    # -- forward -------------------------------------------------------------------------------

    @nvtx.annotate("dit_fast.AdaLNPack")
    def __call__(self, c: Tensor) -> List[Tensor]:
        """[lin(SiLU(c)) for lin in linears], as views of one (N, sum(out)) GEMM output."""
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != self.linears[0].in_features:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"AdaLNPack: c must have shape (N, {self.linears[0].in_features}), "
                             f"got {shape}")
        has_bias = self.linears[0].bias is not None
        params = self._params()
        if torch.compiler.is_compiling():
            w = torch.cat([lin.weight for lin in self.linears], dim=0)
            b = torch.cat([lin.bias for lin in self.linears], dim=0) if has_bias else None
        elif torch.is_grad_enabled() and any(p.requires_grad for p in params):
            if self.share_storage:
                w, b = self.stacked()
                w = _Alias.apply(w, self.sizes, *[lin.weight for lin in self.linears])
                if has_bias:
                    b = _Alias.apply(b, self.sizes, *[lin.bias for lin in self.linears])
            else:
                w = torch.cat([lin.weight for lin in self.linears], dim=0)
                b = torch.cat([lin.bias for lin in self.linears], dim=0) if has_bias else None
        else:
            w, b = self.stacked()
        out = adaln_modulation(c, w, b)
        return list(out.split(self.sizes, dim=1))
