"""Kernel microbenchmarks: every op of dit_fast.ops, on each backend that can run here, in the model's
shapes (GPU: DiT-XL/2, batch 32, bf16; CPU: DiT-S/2, batch 8, fp32 and bf16).

    pytest bench --benchmark-only                         # all
    pytest bench --benchmark-only -k attention            # one op
    pytest bench --benchmark-only --benchmark-json out.json

The `reference` backend (plain PyTorch) is the baseline of each op; the `cpu` / `triton` / `cuda` rows are
the fused kernels. Each benchmark first checks its output against the PyTorch reference (so a broken
kernel is not timed), then records extra_info: the bytes the op must move at least (GB/s = bytes /
median time) and, for ops with matmul work, TFLOP/s. Backends that cannot run an op here are skipped
with the registry's reason; the Triton interpreter (CPU) is not benchmarked.
"""
import importlib

import pytest
import torch

from dit_fast import _backends
from dit_fast._backends import use_backend

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# (N, T, D, heads, depth): DiT-XL/2 or DiT-S/2 at 256 px (32x32 latent, patch 2).
N, T, D, H, DEPTH = (32, 256, 1152, 16, 28) if GPU else (8, 256, 384, 6, 12)
P, C, LATENT = 2, 4, 32
DTYPES = {"bf16": torch.bfloat16} if GPU else {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("reference",) + ((("triton", "cuda") if GPU else ("cpu",)))
TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def _sync():
    if GPU:
        torch.cuda.synchronize()


def _require(op, backend, tensor):
    reason = _backends.explain(op, tensor).get(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _bench(benchmark, backend, fn, ref, *, nbytes, flop=0):
    """Checks fn() against ref() once, then times fn under `backend`; records GB/s and TFLOP/s."""
    with use_backend(backend):
        out = fn()
    expect = ref()
    for o, e in zip(out if isinstance(out, tuple) else (out,), expect if isinstance(expect, tuple) else (expect,)):
        tol = TOL.get(o.dtype, 2e-3)
        torch.testing.assert_close(o.float(), e.float(), atol=tol, rtol=tol)

    def run():
        with use_backend(backend):
            fn()
        _sync()

    benchmark.extra_info.update(backend=backend, device=DEVICE, bytes=nbytes, flop=flop)
    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
        if flop:
            benchmark.extra_info["TFLOP/s"] = round(flop / median / 1e12, 4)


def _esize(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def _randn(*shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))).to(DEVICE, dtype)


dtype_params = pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
backend_params = pytest.mark.parametrize("backend", BACKENDS)


@backend_params
@dtype_params
def test_ln_modulate(benchmark, backend, dtype):
    from dit_fast.ops import ln_modulate, ln_modulate_ref
    x = _randn(N, T, D, dtype=dtype)
    mod = _randn(N, 6 * D, dtype=dtype, scale=0.5)  # chunks of the adaLN output, as in the model
    shift, scale = mod[:, :D], mod[:, D:2 * D]
    _require("ln_modulate", backend, x)
    _bench(benchmark, backend, lambda: ln_modulate(x, shift, scale),
           lambda: ln_modulate_ref(x.float(), shift.float(), scale.float()),
           nbytes=(2 * N * T * D + 2 * N * D) * _esize(dtype))


@backend_params
@dtype_params
def test_attention(benchmark, backend, dtype):
    from dit_fast.ops import attention_qkv, attention_ref
    qkv = _randn(N, T, 3 * D, dtype=dtype)
    _require("attention", backend, qkv)
    _bench(benchmark, backend, lambda: attention_qkv(qkv, H), lambda: attention_ref(qkv.float(), H),
           nbytes=(N * T * 3 * D + N * T * D) * _esize(dtype), flop=4 * N * T * T * D)


@backend_params
@dtype_params
def test_patch_embed(benchmark, backend, dtype):
    from dit_fast.ops import patch_embed, patch_embed_ref
    x = _randn(N, C, LATENT, LATENT, dtype=dtype)
    w = _randn(D, C, P, P, dtype=dtype, scale=0.2)
    b = _randn(D, dtype=dtype)
    pos = _randn(1, T, D, dtype=dtype)
    _require("patch_embed", backend, x)
    _bench(benchmark, backend, lambda: patch_embed(x, w, b, pos, P),
           lambda: patch_embed_ref(x.float(), w.float(), b.float(), pos.float(), P),
           nbytes=(x.numel() + w.numel() + pos.numel() + N * T * D) * _esize(dtype),
           flop=2 * N * T * C * P * P * D)


@backend_params
@dtype_params
def test_unpatchify(benchmark, backend, dtype):
    from dit_fast.ops import unpatchify, unpatchify_ref
    y = _randn(N, T, P * P * 2 * C, dtype=dtype)
    _require("unpatchify", backend, y)
    _bench(benchmark, backend, lambda: unpatchify(y, P, 2 * C), lambda: unpatchify_ref(y, P, 2 * C),
           nbytes=2 * y.numel() * _esize(dtype))


@backend_params
@dtype_params
def test_timestep_embedding(benchmark, backend, dtype):
    from dit_fast.ops import timestep_embedding, timestep_embedding_ref
    t = torch.randint(0, 1000, (N,), device=DEVICE)
    _require("timestep_embedding", backend, t.float())
    _bench(benchmark, backend, lambda: timestep_embedding(t, 256, dtype=dtype),
           lambda: timestep_embedding_ref(t, 256), nbytes=N * 8 + N * 256 * _esize(dtype))


@pytest.mark.parametrize("impl", ["per-block", "packed"])
@dtype_params
def test_adaln(benchmark, impl, dtype):
    """The adaLN projections of all blocks + the final layer: one Linear each (per-block, the official
    model) against dit_fast's AdaLNPack (one GEMM). Backend-independent (a GEMM)."""
    from dit_fast.ops import AdaLNPack, adaln_modulation_ref
    torch.manual_seed(0)
    linears = [torch.nn.Linear(D, 6 * D) for _ in range(DEPTH)] + [torch.nn.Linear(D, 2 * D)]
    linears = [lin.to(DEVICE, dtype).requires_grad_(False) for lin in linears]
    c = _randn(N, D, dtype=dtype)
    pack = AdaLNPack(linears)
    fn = (lambda: tuple(adaln_modulation_ref(c, linears))) if impl == "per-block" else (lambda: tuple(pack(c)))
    out_features = sum(lin.out_features for lin in linears)
    _bench(benchmark, "reference", fn, lambda: tuple(adaln_modulation_ref(c, linears)),
           nbytes=(out_features * D + N * D + N * out_features) * _esize(dtype), flop=2 * N * D * out_features)


@backend_params
@dtype_params
@pytest.mark.parametrize("guided", [True, False], ids=["cfg", "plain"])
def test_sampler_step(benchmark, backend, dtype, guided):
    """One DDPM learned-range step on the latent batch (guided: the doubled-batch model output and
    the guidance combine in the same kernel)."""
    from dit_fast.ops.sampler_step import ddpm_coefs, ddpm_step, ddpm_step_ref
    x = _randn(N, C, LATENT, LATENT, dtype=dtype)
    noise = _randn(N, C, LATENT, LATENT, dtype=dtype)
    out = _randn(2 * N if guided else N, 2 * C, LATENT, LATENT, dtype=dtype, scale=0.5).clamp(-1, 1)
    g = torch.Generator().manual_seed(1)
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(N, generator=g)).to(DEVICE)  # noqa: E731
    coefs = ddpm_coefs(u(1.0, 3.0), u(0.1, 2.0), u(0.1, 0.9), u(0.1, 0.9), u(-8.0, -4.0), u(-4.0, -2.0),
                       torch.ones(N, device=DEVICE))
    kw = dict(cfg_scale=4.0, guide_channels=3) if guided else {}
    _require("sampler_step", backend, x)
    # model output, x and noise in; sample and pred_xstart out (float32)
    nbytes = (out.numel() + 2 * x.numel()) * _esize(dtype) + 2 * x.numel() * 4
    _bench(benchmark, backend, lambda: ddpm_step(out, x, noise, coefs, clip_denoised=False, **kw),
           # the reference in the data's dtype: the fused step keeps the guidance arithmetic in it
           lambda: ddpm_step_ref(out, x, noise, coefs, clip_denoised=False, **kw),
           nbytes=nbytes)


@backend_params
@dtype_params
@pytest.mark.parametrize("variant", ["plain", "ln_modulate"])
def test_gated_residual(benchmark, backend, dtype, variant):
    """x + gate * y (plain), or fused with the next LayerNorm + modulate (ln_modulate)."""
    G = importlib.import_module("dit_fast.ops.gated_residual")  # the module (the package re-exports the function)
    x, y = _randn(N, T, D, dtype=dtype), _randn(N, T, D, dtype=dtype)
    params = _randn(N, 3 * D, dtype=dtype, scale=0.5)
    gate, shift, scale = params[:, :D], params[:, D:2 * D], params[:, 2 * D:]
    es = _esize(dtype)
    if variant == "plain":
        _require(G.OP_NAME_PLAIN, backend, x)
        _bench(benchmark, backend, lambda: G.gated_residual(x, y, gate),
               lambda: G.gated_residual_ref(x.float(), y.float(), gate.float()),
               nbytes=3 * N * T * D * es)
    else:
        _require(G.OP_NAME, backend, x)
        _bench(benchmark, backend, lambda: tuple(G.gated_residual_ln_modulate(x, y, gate, shift, scale)),
               lambda: tuple(G.gated_residual_ln_modulate_ref(x.float(), y.float(), gate.float(),
                                                              shift.float(), scale.float())),
               nbytes=4 * N * T * D * es)


@backend_params
@dtype_params
@pytest.mark.parametrize("variant", ["gelu_bias", "linear_gelu"])
def test_gelu(benchmark, backend, dtype, variant):
    """The MLP's bias + tanh-GELU epilogue alone (gelu_bias) and with its fc1 GEMM (linear_gelu)."""
    GE = importlib.import_module("dit_fast.ops.gelu")
    Fh = 4 * D
    es = _esize(dtype)
    bias = _randn(Fh, dtype=dtype, scale=0.1)
    _require(GE.OP_NAME, backend, bias)
    if variant == "gelu_bias":
        h = _randn(N, T, Fh, dtype=dtype)
        _bench(benchmark, backend, lambda: GE.gelu_bias(h, bias), lambda: GE.gelu_bias_ref(h.float(), bias.float()),
               nbytes=2 * h.numel() * es)
    else:
        x = _randn(N, T, D, dtype=dtype)
        w = _randn(Fh, D, dtype=dtype, scale=D ** -0.5)
        _bench(benchmark, backend, lambda: GE.linear_gelu(x, w, bias),
               lambda: GE.linear_gelu_ref(x.float(), w.float(), bias.float()),
               nbytes=(x.numel() + w.numel() + N * T * Fh) * es, flop=2 * N * T * D * Fh)
