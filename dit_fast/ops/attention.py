"""Multi-head self-attention straight from the qkv Linear's output (DiT's `Attention` core).

    qkv: (N, T, 3*D), the output of ``Linear(D, 3*D)``, viewed as (N, T, 3, H, Dh)
    out: (N, T, D) = softmax(q k^T / sqrt(Dh)) v per head, heads merged (ready for ``proj``)

Public API: `attention_qkv(qkv, num_heads)` (dispatches to a backend, see dit_fast._backends),
`attention_ref(qkv, num_heads)` (SDPA on permuted views: the ground truth in float64) and
`explain(qkv, num_heads)` (which backend runs for an input, and why the others do not).

Backends (docs/design.md#attention has the details):
  ``cuda``       the flash-attn package (fp16/bf16, head dim <= 256 and a multiple of 8, sm >= 80);
                 its probe is the package, not dit_fast._C_cuda.
  ``triton``     dit_fast.kernels.triton.attention (fp16/bf16/fp32, head dims 64, 72, 128); fp32
                 uses TF32 tensor cores when torch allows TF32 for fp32 matmuls.
  ``cpu``        forward per dtype (`_CPU_FORWARD`): the C++ kernel (csrc/cpu/attention.cpp) or
                 PyTorch's CPU flash-attention on strided views of qkv; backward: the latter's.
  ``reference``  `attention_ref`; inside the custom op the same math in fp32 (fp64 for fp64)
                 with an explicit logsumexp, chunked over the batch. Serves what others refuse.

Structure (as in ln_modulate): custom ops ``dit_fast::attention`` (qkv, num_heads) -> (out, lse)
and ``dit_fast::attention_backward`` -> dqkv, with fake impls and `register_autograd`. lse is
(N, H, T) float32 (float64 for float64 qkv), the natural-log logsumexp of the scaled scores, for
every backend, so forward and backward may run on different backends. Eager inference (and eager
``reference`` / ``cuda`` with grad) skips the custom-op layer. `_backends.explain("attention", t)`
needs the packed view ``qkv.view(N, T, 3, H, Dh)`` for its head-dim checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from .. import _backends, nvtx, validation

__all__ = ["attention_qkv", "attention_ref", "explain", "OP_NAME"]

OP_NAME = "attention"

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_TRITON_HEAD_DIMS = (64, 72, 128)  # == dit_fast.kernels.triton.attention.SUPPORTED_HEAD_DIMS


# ---- backend availability / support checks ----------------------------------------------------

_flash_cache: dict = {}


def _flash_fn():
    """flash_attn.flash_attn_qkvpacked_func, or None (cached)."""
    if "fn" not in _flash_cache:
        fn, err = None, None
        if importlib.util.find_spec("flash_attn") is None:
            err = "flash-attn is not installed"
        else:
            try:
                fn = importlib.import_module("flash_attn").flash_attn_qkvpacked_func
            except Exception as e:  # noqa: BLE001 - ImportError, missing CUDA libraries, ...
                err = f"flash-attn is not importable: {type(e).__name__}: {e}"
        _flash_cache["fn"], _flash_cache["err"] = fn, err
    return _flash_cache["fn"]


def _probe_flash_attn() -> Optional[str]:
    reasons = []
    if _flash_fn() is None:
        reasons.append(_flash_cache["err"])
    no_dev = _backends._no_cuda_device()
    if no_dev:
        reasons.append(no_dev)
    return "; ".join(reasons) or None


_has_native_op: list = []


def _probe_cpu() -> Optional[str]:
    """dit_fast._C, and one recent enough to have the attention kernel."""
    reason = _backends._probe("cpu")
    if reason is None:
        if not _has_native_op:
            _has_native_op.append(hasattr(torch.ops.dit_fast, "attention_fwd"))
        if not _has_native_op[0]:
            reason = "dit_fast._C was built without attention_fwd (rebuild the extension)"
    return reason


def _head_dim(t: Tensor) -> Optional[int]:
    """Head dim of the packed (N, T, 3, H, Dh) view; None for any other tensor."""
    return int(t.shape[-1]) if t.dim() == 5 and t.shape[2] == 3 else None


def _flash_supports(t: Tensor) -> Optional[str]:
    hd = _head_dim(t)
    if hd is not None and (hd > 256 or hd % 8 != 0):
        return f"flash-attn supports head dims <= 256 that are multiples of 8, not {hd}"
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 0):
        return "flash-attn needs compute capability >= 8.0"
    return None


def _triton_supports(t: Tensor) -> Optional[str]:
    hd = _head_dim(t)
    if hd is not None and hd not in _TRITON_HEAD_DIMS:
        return (f"Triton attention supports head dims {', '.join(map(str, _TRITON_HEAD_DIMS))}, "
                f"not {hd}")
    return None


def _validate(backend: str, like: Tensor, grad: bool = True, exact: bool = False):
    """Kernel check for dit_fast.validation on qkv built like the packed view `like` (N, T, 3, H,
    Dh): same head dim; small (1 x <= 67 tokens x <= 2 heads) unless `exact`. Bound: the
    tolerance, plus twice SDPA's own error at that dtype for the forward (the backward has no
    such peer: it may run inside the backward op, below autograd)."""
    N, T, _, H, Dh = like.shape if _head_dim(like) is not None else (1, 16, 3, 2, 64)
    if not exact:
        N, T, H = 1, max(1, min(T, 67)), max(1, min(H, 2))
    qkv = validation.randn((N, T, 3 * H * Dh), like)
    dout = validation.randn((N, T, H * Dh), like, seed=1)

    def bwd(b, qkv, dout):
        return _run_backward(b, dout, qkv, *_run_forward(b, qkv, H), H)

    floor = None
    if backend == "triton" and like.dtype == torch.float32 and _triton_tf32():
        # TF32 dots (torch allows TF32): products of operands cut to 10 mantissa bits, summed over
        # K = max(T, Dh) terms like a random walk (tests/error_rule.py, c = 2)
        floor = lambda m: 2 * math.sqrt(max(T, Dh)) * 2.0 ** -10 * m  # noqa: E731
    return validation.run_phases(OP_NAME, backend, [
        validation.phase("fwd", lambda b, qkv: _run_forward(b, qkv, H), (qkv,), ("out", "lse"),
                         peer=lambda: (attention_ref(qkv, H), None), floor=floor),
        validation.phase("bwd", bwd, (qkv, dout), ("dqkv",), kind="grad", floor=floor),
    ], grad)


def _triton_tf32() -> bool:
    from ..kernels.triton import attention as K
    return K._dot_precision(torch.float32) == "tf32"


def _examples(device, dtype):
    """Packed qkv views: DiT-XL/2 (1, 256, 3, 16, 72), head dims 64 / 128, an odd 40 (T 37)."""
    return [torch.empty(1, 256, 3, 16, 72, device=device, dtype=dtype),
            torch.empty(1, 37, 3, 3, 64, device=device, dtype=dtype),
            torch.empty(1, 37, 3, 2, 128, device=device, dtype=dtype),
            torch.empty(1, 37, 3, 2, 40, device=device, dtype=dtype)]


_backends.register_op(
    OP_NAME,
    {"reference": None, "cpu": _CPU_DTYPES, "triton": _TRITON_DTYPES, "cuda": _FLASH_DTYPES},
    probes={"cuda": _probe_flash_attn, "cpu": _probe_cpu},
    supports={"cuda": _flash_supports, "triton": _triton_supports},
    shape_class=_head_dim, validate=_validate, examples=_examples,
)


# ---- reference ------------------------------------------------------------------------------

def attention_ref(qkv: Tensor, num_heads: int) -> Tensor:
    """The model's expression: ``qkv.reshape(N, T, 3, H, Dh).permute(2, 0, 3, 1, 4)``, SDPA,
    ``.transpose(1, 2).reshape(N, T, D)``. Run it in float64 for ground truth."""
    _check_inputs(qkv, num_heads)
    N, T, C = qkv.shape
    D = C // 3
    q, k, v = qkv.reshape(N, T, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)


# ---- input validation -----------------------------------------------------------------------

def _check_inputs(qkv: Tensor, num_heads: int) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise ValueError(f"attention: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"attention: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3:
        raise ValueError(f"attention: qkv must be 3-D (N, T, 3*D), got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"attention: qkv must be a floating-point tensor, got {qkv.dtype}")
    C = qkv.shape[-1]
    if C == 0 or C % (3 * num_heads) != 0:
        raise ValueError(f"attention: qkv's last dim ({C}) must be a positive multiple of "
                         f"3 * num_heads = {3 * num_heads} (qkv is (N, T, 3*D), D = num_heads * "
                         f"head_dim)")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_inner(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _packed(qkv: Tensor, num_heads: int) -> Tensor:
    N, T, C = qkv.shape
    return qkv.view(N, T, 3, num_heads, C // (3 * num_heads))


def _sizes(qkv: Tensor, num_heads: int):
    N, T, C = qkv.shape
    D = C // 3
    return N, T, D, num_heads, D // num_heads


def _select(qkv: Tensor, num_heads: int) -> str:
    return _backends.select(OP_NAME, _packed(qkv, num_heads))  # a view: only its shape is read


def explain(qkv: Tensor, num_heads: int) -> dict:
    """{backend: None if it could run attention on `qkv`, else why not}, in auto order."""
    _check_inputs(qkv, num_heads)
    return _backends.explain(OP_NAME, _packed(qkv, num_heads))


# ---- backend kernels: (qkv, H) -> (out (N, T, D), lse (N, H, T));
#                       (dout, qkv, out, lse, H) -> dqkv (N, T, 3*D) ---------------------------

_REF_CHUNK_ELEMS = 1 << 26  # score elements per batch chunk in the explicit-math reference


def _ref_chunks(N: int, H: int, T: int) -> int:
    return max(1, min(N, _REF_CHUNK_ELEMS // max(1, H * T * T)))


def _qkv_heads(qkv: Tensor, num_heads: int, acc: torch.dtype):
    """q, k, v as (N, H, T, Dh) views in the accumulator dtype."""
    return _packed(qkv, num_heads).to(acc).permute(2, 0, 3, 1, 4).unbind(0)


def _fwd_reference(qkv: Tensor, num_heads: int):
    N, T, D, H, Dh = _sizes(qkv, num_heads)
    acc = _stats_dtype(qkv.dtype)
    scale = 1.0 / math.sqrt(Dh)
    out = qkv.new_empty((N, T, D))
    lse = qkv.new_empty((N, H, T), dtype=acc)
    step = _ref_chunks(N, H, T)
    for n0 in range(0, N, step):
        q, k, v = _qkv_heads(qkv[n0:n0 + step], H, acc)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        m = torch.logsumexp(s, -1)
        o = torch.matmul(torch.exp(s - m.unsqueeze(-1)), v)
        out[n0:n0 + step] = o.transpose(1, 2).reshape(-1, T, D).to(qkv.dtype)
        lse[n0:n0 + step] = m
    return out, lse


def _bwd_reference(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int):
    N, T, D, H, Dh = _sizes(qkv, num_heads)
    acc = _stats_dtype(qkv.dtype)
    scale = 1.0 / math.sqrt(Dh)
    dqkv = qkv.new_empty((N, T, 3 * D))
    step = _ref_chunks(N, H, T)
    for n0 in range(0, N, step):
        sl = slice(n0, n0 + step)
        q, k, v = _qkv_heads(qkv[sl], H, acc)
        do = dout[sl].to(acc).reshape(-1, T, H, Dh).transpose(1, 2)
        o = out[sl].to(acc).reshape(-1, T, H, Dh).transpose(1, 2)
        p = torch.exp(torch.matmul(q, k.transpose(-1, -2)) * scale - lse[sl].to(acc).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.transpose(-1, -2))
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq = torch.matmul(ds, k) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q) * scale
        g = torch.stack((dq, dk, dv), 0)  # (3, n, H, T, Dh)
        dqkv[sl] = g.permute(1, 3, 0, 2, 4).reshape(-1, T, 3 * D).to(qkv.dtype)
    return dqkv


# cpu: forward per dtype (below); PyTorch's CPU flash-attention backward on strided views.
# Forward per dtype, chosen by measurement (bench/README.md, "Notes and measurements"): PyTorch's
# kernel on strided views in fp32, where ours only ties; ours in bf16 (faster) and fp64.
_CPU_FORWARD = {torch.float32: "sdpa_views", torch.bfloat16: "kernel", torch.float64: "kernel"}


def _fwd_cpu_kernel(qkv: Tensor, num_heads: int):
    return torch.ops.dit_fast.attention_fwd(_unit_inner(qkv), num_heads)


def _fwd_cpu_sdpa_views(qkv: Tensor, num_heads: int):
    N, T, D, H, Dh = _sizes(qkv, num_heads)
    q, k, v = (x.transpose(1, 2) for x in _packed(_unit_inner(qkv), H).unbind(2))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    return o.transpose(1, 2).reshape(N, T, D), lse  # o is laid out (N, T, H, Dh): a view


def _fwd_cpu(qkv: Tensor, num_heads: int):
    if _CPU_FORWARD.get(qkv.dtype) == "sdpa_views":
        return _fwd_cpu_sdpa_views(qkv, num_heads)
    return _fwd_cpu_kernel(qkv, num_heads)


def _bwd_cpu(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int):
    N, T, D, H, Dh = _sizes(qkv, num_heads)
    q, k, v = _packed(_unit_inner(qkv), H).unbind(2)  # (N, T, H, Dh) views
    t = lambda x: x.transpose(1, 2)  # noqa: E731  -> (N, H, T, Dh)
    do = t(_unit_inner(dout).reshape(N, T, H, Dh))
    o = t(_unit_inner(out).reshape(N, T, H, Dh))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, t(q), t(k), t(v), o, lse, 0.0, False, scale=1.0 / math.sqrt(Dh))
    return torch.stack((t(dq), t(dk), t(dv)), 2).reshape(N, T, 3 * D)


# triton

def _triton_module():
    return importlib.import_module("dit_fast.kernels.triton.attention")


def _fwd_triton(qkv: Tensor, num_heads: int):
    return _triton_module().attention_fwd(qkv, num_heads)


def _bwd_triton(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int):
    return _triton_module().attention_bwd(dout, qkv, out, lse, num_heads)


# cuda: the flash-attn package

def _fwd_flash(qkv: Tensor, num_heads: int):
    N, T, D, H, Dh = _sizes(qkv, num_heads)
    out, lse, _ = _flash_fn()(_packed(_unit_inner(qkv), H), return_attn_probs=True)
    return out.reshape(N, T, D), lse[..., :T].float().contiguous()


def _bwd_flash(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int):
    """Backward of a flash-attn forward inside the custom op: our Triton kernel when it can serve
    (same lse convention), else the reference math."""
    if _backends.explain(OP_NAME, _packed(qkv, num_heads), ("reference", "triton"))["triton"] is None:
        return _bwd_triton(dout, qkv, out, lse, num_heads)
    return _bwd_reference(dout, qkv, out, lse, num_heads)


_FWD: dict[str, Callable] = {"reference": _fwd_reference, "cpu": _fwd_cpu, "triton": _fwd_triton,
                             "cuda": _fwd_flash}
_BWD: dict[str, Callable] = {"reference": _bwd_reference, "cpu": _bwd_cpu, "triton": _bwd_triton,
                             "cuda": _bwd_flash}


def _run_forward(backend: str, qkv: Tensor, num_heads: int):
    N, T, D, H, _ = _sizes(qkv, num_heads)
    if N * T == 0:
        return qkv.new_empty((N, T, D)), qkv.new_empty((N, H, T), dtype=_stats_dtype(qkv.dtype))
    return _FWD[backend](qkv, num_heads)


def _run_backward(backend: str, dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor,
                  num_heads: int):
    if qkv.numel() == 0:
        return torch.zeros_like(qkv, memory_format=torch.contiguous_format)
    return _BWD[backend](dout, qkv, out, lse, num_heads)


def _forward(qkv: Tensor, num_heads: int):
    return _run_forward(_select(qkv, num_heads), qkv, num_heads)


# ---- custom ops -----------------------------------------------------------------------------

@torch.library.custom_op("dit_fast::attention", mutates_args=())
def _attention_op(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    out, lse = _forward(qkv, num_heads)
    return out.contiguous(), lse.contiguous()


@_attention_op.register_fake
def _(qkv, num_heads):
    N, T, C = qkv.shape
    return (qkv.new_empty((N, T, C // 3)),
            qkv.new_empty((N, num_heads, T), dtype=_stats_dtype(qkv.dtype)))


@torch.library.custom_op("dit_fast::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor,
                           num_heads: int) -> Tensor:
    return _run_backward(_select(qkv, num_heads), dout, qkv, out, lse, num_heads).contiguous()


@_attention_backward_op.register_fake
def _(dout, qkv, out, lse, num_heads):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return _attention_backward_op(dout, qkv, out, lse, ctx.num_heads), None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# FlopCounterMode (torch.utils.flop_counter) does not look inside custom ops: without these formulas
# the attention matmuls would silently drop out of counted FLOPs. Same counts as torch's SDPA formulas.
def _head_shape(qkv_shape, num_heads: int):
    N, T, C = qkv_shape
    return (N, num_heads, T, C // 3 // num_heads)


@register_flop_formula(torch.ops.dit_fast.attention)
def _attention_flops(qkv_shape, num_heads, *args, out_shape=None, **kwargs) -> int:
    h = _head_shape(qkv_shape, num_heads)
    return sdpa_flop_count(h, h, h)


@register_flop_formula(torch.ops.dit_fast.attention_backward)
def _attention_backward_flops(dout_shape, qkv_shape, out_shape_, lse_shape, num_heads, *args,
                              out_shape=None, **kwargs) -> int:
    h = _head_shape(qkv_shape, num_heads)
    return sdpa_backward_flop_count(h, h, h, h)


def _register_native_fakes() -> None:
    """Fake (meta) kernel for the C++ op, so it can be traced / opcheck'ed directly too."""
    if _probe_cpu() is not None:  # dit_fast._C not built (or too old): the op does not exist
        return

    @torch.library.register_fake("dit_fast::attention_fwd")
    def _(qkv, num_heads):
        N, T, C = qkv.shape
        return (qkv.new_empty((N, T, C // 3)),
                qkv.new_empty((N, num_heads, T), dtype=_stats_dtype(qkv.dtype)))


_register_native_fakes()


# ---- public API -----------------------------------------------------------------------------

@nvtx.annotate("dit_fast.attention_qkv")
def attention_qkv(qkv: Tensor, num_heads: int) -> Tensor:
    """Self-attention of the qkv Linear's output: (N, T, 3*D) -> (N, T, D), heads merged.

    Equals `attention_ref` (softmax scale 1/sqrt(head_dim), no mask, no dropout). q, k and v are
    read in place from the packed (N, T, 3, H, Dh) layout (any N / T strides; a non-unit stride
    along the last dim costs one copy). Differentiable w.r.t. qkv (first order); works under
    torch.compile(fullgraph=True). The backend follows DIT_FAST_BACKEND / use_backend (see the
    module docstring). Raises ValueError naming the argument for malformed inputs.
    """
    _check_inputs(qkv, num_heads)
    if not torch.compiler.is_compiling():
        backend = _select(qkv, num_heads)
        if backend == "reference":
            return attention_ref(qkv, num_heads)
        if backend == "cuda":  # flash-attn's own autograd (fused backward kernel)
            N, T, D, H, Dh = _sizes(qkv, num_heads)
            return _flash_fn()(_packed(_unit_inner(qkv), H)).reshape(N, T, D)
        # Eager inference skips the op/autograd layers (host overhead), unless a dispatch mode
        # (FlopCounterMode, FakeTensorMode, ...) is active: those must see the named op.
        if not (torch.is_grad_enabled() and qkv.requires_grad) and torch._C._len_torch_dispatch_stack() == 0:
            return _run_forward(backend, qkv, num_heads)[0]
    return _attention_op(qkv, num_heads)[0]
