"""Conditioning ops of DiT: the adaLN projections of all blocks as one batched GEMM, and the fused
sinusoidal timestep embedding.

(a) `adaln_projections(c, linears)` / `AdaLNPack`: every DiT block computes
    ``adaLN_modulation(c) = Linear(SiLU(c))`` from the same c (N, D). Stacking the blocks' weights
    (depth*6D, D) turns depth small GEMMs (and depth SiLUs) into one ``SiLU(c) @ W_all^T + b_all``;
    each block gets an (N, 6D) view of the result (row stride depth*6D, unit stride along 6D,
    which ln_modulate reads in place). The stacked weight is not a copy: the layers' parameters
    are views into one buffer (`share_adaln_storage`), so optimizer steps, ``param.data`` writes
    (diffusers' EMAModel), load_state_dict and in-place edits change the buffer itself and the
    GEMM can never read stale weights. Every call checks, with pointer compares, that each
    parameter still sits at its place in the buffer, and re-aliases when something re-pointed one
    (``param.data = new``, ``.to()``, ``load_state_dict(assign=True)``, a swapped layer).
    Gradients flow back to every layer's own weight and bias. The parameters stay distinct
    nn.Parameters (views): optimizers (foreach and fused included) and DDP (its buckets hold
    gradients; its broadcasts copy into the parameters in place) treat them as independent ones.
    The GEMM runs on the vendor BLAS (cuBLAS / oneDNN / MKL) through torch on every backend: a
    hand-written kernel would not beat it, and SiLU(c) is a tiny (N, D) elementwise op. Under
    torch.compile (pointer checks cannot run there) each layer runs its own GEMM, as in the official
    model: stacking the weights inside the graph would copy all of them in every call.

(b) `timestep_embedding(t, dim=256, max_period=10000)`: ``TimestepEmbedder.timestep_embedding``
    in one kernel: [cos(t * freqs), sin(t * freqs)] (+ a zero column for odd dim), float32 math
    exactly as the official code (the frequency table is computed once per (dim, max_period,
    device) with the official PyTorch expression and cached; the kernel does the float32 product
    and cos/sin). `dtype=` writes the embedding directly in the model dtype (the `.to(dtype)` that
    feeds the first MLP GEMM, fused).

Model wiring (dit_fast/models/dit.py)::

    # DiT.__init__, after the blocks and final layer are built:
    share_adaln_storage(self.adaln_layers())   # per-block parameters become views of one buffer
    # DiT.block_modulations, with c = t + y (the layers are looked up at every call):
    mods = adaln_projections(c, self.adaln_layers())  # (N, 6D) per block, then (N, 2D) final
    # TimestepEmbedder.forward:
    t_freq = timestep_embedding(t, self.frequency_embedding_size, dtype=self.mlp[0].weight.dtype)

Caches: none of weights here. `_FREQS` caches the frequency table of (dim, max_period, device),
a constant that no weight update changes.
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
from .linear import cpu_linear, cpu_linear_applies

__all__ = ["AdaLNPack", "adaln_projections", "share_adaln_storage", "adaln_modulation", "adaln_modulation_ref", "timestep_embedding",
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
    """``SiLU(c) @ weight^T + bias`` for a stacked weight (sum of out_features, D); in CPU
    inference on dit_fast's few-rows GEMM where it runs (ops.linear)."""
    s = F.silu(c)
    if cpu_linear_applies(s, weight, bias):
        return cpu_linear(s, weight, bias)
    return F.linear(s, weight, bias)


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


def _stack_view(ts: Sequence[Tensor]) -> Optional[Tensor]:
    """The stacked (sum of rows, ...) tensor whose consecutive row blocks `ts` are, or None if
    they are not laid out that way: same dtype, device and trailing shape, contiguous, each
    starting where the previous one ends, inside the first one's storage. Pointer compares only:
    anything that re-points a parameter (``param.data = ...``, ``.to()``,
    ``load_state_dict(assign=True)``, a swapped layer) makes it return None."""
    t0 = ts[0]
    dtype, device, dim = t0.dtype, t0.device, t0.dim()
    if dim not in (1, 2):
        return None
    row = t0.size(-1) if dim == 2 else 1  # elements per row (weights: in_features; biases: 1)
    ptr = start = t0.data_ptr()
    for t in ts:  # (the cheapest tensor attributes: this runs at every call)
        if (t.data_ptr() != ptr or t.dtype != dtype or t.device != device or t.dim() != dim
                or (dim == 2 and t.size(1) != row) or not t.is_contiguous()):
            return None
        ptr += t.nbytes
    storage = t0.untyped_storage()
    if start == 0 or ptr - storage.data_ptr() > storage.nbytes():
        return None
    rows = (ptr - start) // (row * t0.element_size())
    return t0.detach().as_strided((rows, row) if dim == 2 else (rows,), (row, 1) if dim == 2 else (1,),
                                  t0.storage_offset())


def _check_layers(linears: Sequence[nn.Linear]) -> None:
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"AdaLNPack: linears[{i}] must be an nn.Linear, got {type(lin).__name__}")
        if lin.in_features != linears[0].in_features:
            raise ValueError(f"AdaLNPack: linears[{i}] has in_features={lin.in_features}, expected "
                             f"{linears[0].in_features} (all layers must read the same c)")
        if (lin.bias is None) != (linears[0].bias is None):
            raise ValueError(f"AdaLNPack: linears[{i}] must have a bias iff linears[0] has one")
        w0 = linears[0].weight
        for name, p in (("weight", lin.weight), ("bias", lin.bias)):
            if p is not None and (p.dtype != w0.dtype or p.device != w0.device):
                raise ValueError(f"AdaLNPack: linears[{i}].{name} is {p.dtype} on {p.device}, "
                                 f"expected {w0.dtype} on {w0.device} (all layers must match)")


def _aliasable(params: Sequence[Tensor]) -> bool:
    """Whether `params` may be re-pointed into one buffer: the layers' own nn.Parameters, on a
    real device. Anything else (torch.func.functional_call's tensors, tensor subclasses such as
    DTensor, meta tensors) is only read (one GEMM per layer)."""
    return all(type(p) is nn.Parameter and p.device.type != "meta" and p.numel() > 0 for p in params)


def share_adaln_storage(linears: Sequence[nn.Linear]) -> bool:
    """Re-points the layers' weights (and biases) into one stacked buffer, in order, so that
    ``SiLU(c) @ W_all^T + b_all`` reads the parameters themselves: nothing to copy or refresh.
    Values, shapes, parameter objects and state_dict keys are unchanged; a no-op if they already
    share one buffer. Returns False (and changes nothing) for parameters that are not plain
    nn.Parameters (see `_aliasable`)."""
    linears = list(linears)
    _check_layers(linears)
    groups = [[lin.weight for lin in linears]]
    if linears[0].bias is not None:
        groups.append([lin.bias for lin in linears])
    if not all(_aliasable(ps) for ps in groups):
        return False
    # never inside inference mode (the buffer would be an inference tensor, unusable for training)
    # nor under autograd (this is storage bookkeeping, not math)
    with torch.inference_mode(False), torch.no_grad():
        for ps in groups:
            if _stack_view(ps) is None:
                buf = torch.cat([p.detach() for p in ps], dim=0)
                for p, view in zip(ps, buf.split([p.shape[0] for p in ps], dim=0)):
                    p.data = view
    return True


def _stacked(ps: Sequence[Tensor], linears: Sequence[nn.Linear]) -> Optional[Tensor]:
    """The parameters `ps` stacked along dim 0 as their shared buffer (after re-aliasing them if
    something re-pointed one), or None where they cannot be aliased, under torch.compile (which
    cannot see the aliasing) and during CUDA-graph capture."""
    if torch.compiler.is_compiling() or not all(type(p) is nn.Parameter for p in ps):
        return None
    w = _stack_view(ps)
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if w is None and not capturing and share_adaln_storage(linears):
        w = _stack_view(ps)
    if w is not None and torch.is_grad_enabled() and any(p.requires_grad for p in ps):
        w = _Alias.apply(w, [p.shape[0] for p in ps], *ps)
    return w


@nvtx.annotate("dit_fast.AdaLNPack")
def adaln_projections(c: Tensor, linears: Sequence[nn.Linear]) -> List[Tensor]:
    """``[lin(SiLU(c)) for lin in linears]`` as views of ONE (N, sum(out)) GEMM output.

    The parameters are aliased into one stacked buffer (`share_adaln_storage`), which the GEMM
    reads directly: no copy in training or inference and nothing that can go stale. Every call
    checks with pointer compares that each current parameter still sits at its place in the
    buffer and re-aliases otherwise (after ``param.data = ...``, ``.to()``,
    ``load_state_dict(assign=True)`` or a swapped layer), so callers pass the layers as they are
    now (DiT looks them up from its blocks at every call). Under torch.compile, CUDA-graph capture
    or for parameters that cannot be aliased, each layer runs its own GEMM instead (stacking the
    weights would copy all of them in every call). Gradients flow back to every layer's own
    weight and bias.
    """
    linears = list(linears)
    if not linears:
        raise ValueError("AdaLNPack: linears must contain at least one nn.Linear")
    d = linears[0].in_features if isinstance(linears[0], nn.Linear) else None
    if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != d:
        shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f"AdaLNPack: c must have shape (N, {d}), got {shape}")
    w = _stacked([lin.weight for lin in linears], linears)
    b = _stacked([lin.bias for lin in linears], linears) if linears[0].bias is not None else None
    if w is None or (linears[0].bias is not None and b is None):
        if not torch.compiler.is_compiling():
            _check_layers(linears)
        return [adaln_modulation(c, lin.weight, lin.bias) for lin in linears]  # the same GEMMs
    out = adaln_modulation(c, w, b)                                  # (N, sum(out))
    return list(out.split([lin.out_features for lin in linears], dim=1))


class AdaLNPack:
    """A fixed list of adaLN projections that share the conditioning input, computed as ONE GEMM:
    ``AdaLNPack(linears)(c) == [lin(SiLU(c)) for lin in linears]`` (`adaln_projections`).

    Construction aliases the layers' parameters into one stacked buffer (`share_adaln_storage`).
    Not an nn.Module and holds no tensors: nothing to invalidate, nothing added to a state_dict.
    A model whose layers can be swapped should call `adaln_projections(c, current_layers)`
    instead of holding a pack (DiT does).
    """

    def __init__(self, linears: Sequence[nn.Linear]):
        self.linears = list(linears)
        if not self.linears:
            raise ValueError("AdaLNPack: linears must contain at least one nn.Linear")
        share_adaln_storage(self.linears)

    def __call__(self, c: Tensor) -> List[Tensor]:
        return adaln_projections(c, self.linears)
