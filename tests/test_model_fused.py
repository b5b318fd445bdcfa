"""The model's default (fused) path against the reference backend (the official math).

DiT-S/2-shaped models (hidden 384, 6 heads, patch 2, MLP ratio 4) with a reduced depth and a 6x6
latent (9 tokens: not a multiple of any kernel block), every conditioning block, batch 1 and an odd
batch. Forward outputs AND the gradients of every parameter are compared:
  * fp32: fused vs reference, tight tolerance (both are fp32-accurate; they differ by summation
    order only);
  * bf16: both against a float64 run of the reference, and the fused path's relative error must be
    within 1.5x the reference path's own bf16 error (plus a floor at bf16's resolution,
    tests/error_rule.py): fusion may not lose accuracy.
The model's wiring (which modulation feeds which norm, the cross-block fusion, ...) is checked
against `official_forward`, the official model's math written out here with plain PyTorch ops:
the reference backend must equal it bit for bit (fp32), the fused path closely (forward and
gradients). Also: which fused ops the default path dispatches (so these comparisons cannot pass by silently
running the reference), the forced cpu and triton (Triton's interpreter, tiny shapes) backends,
torch.compile(fullgraph=True) against eager, the AdaLNPack cache under training updates, and the
NVTX ranges.
"""

import copy
import importlib.util
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dit_fast
from dit_fast import BLOCK_TYPES, DiT, _backends, nvtx
from dit_fast.tolerances import tol
from error_rule import error_floor

HAS_C = _backends._probe("cpu") is None
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = _backends.triton_interpreter() and not torch.cuda.is_available()

S2 = dict(input_size=6, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6,
          num_classes=10)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def make_model(block="adaLN-Zero", cfg=S2, seed=0):
    """Random weights everywhere (the zero-initialized adaLN / output layers too), eval mode (no
    label dropout: runs must see the same labels)."""
    torch.manual_seed(seed)
    model = DiT(**cfg, block=block)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def make_inputs(n, cfg=S2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg["input_size"]
    x = torch.randn(n, cfg["in_channels"], s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    return x, t, y


def run(model, backend, x, t, y, seed=0):
    """(output, {name: grad}) of a forward and a backward of a fixed random projection."""
    model.zero_grad(set_to_none=True)
    with dit_fast.use_backend(backend):
        out = model(x, t, y)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out.shape, generator=g).to(out.dtype)
        (out * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(v is not None for v in grads.values())
    return out.detach(), grads


# fp32 parameter gradients are sums over tokens and samples; fused and reference differ in the
# summation order only (measured: ~2e-6 relative, in the norm), a wiring error by O(1).
FP32_GRAD_REL = 2e-5


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- the official math, written out ----------------------------------------------------------

def official_forward(m, x, t, y):
    """facebookresearch/DiT models.py's forward (and the paper's other three blocks as dit_fast
    documents them) with plain PyTorch ops on `m`'s parameters; no dit_fast op is called."""
    N, D, H = x.shape[0], m.pos_embed.shape[-1], m.num_heads
    lin = lambda layer, v: F.linear(v, layer.weight, layer.bias)  # noqa: E731
    norm = lambda v, ln: F.layer_norm(v, (D,), ln.weight, ln.bias, ln.eps)  # noqa: E731
    modulate = lambda v, shift, scale: v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # noqa: E731

    def attn(a, v):
        n, T, _ = v.shape
        q, k, vv = lin(a.qkv, v).reshape(n, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        return lin(a.proj, F.scaled_dot_product_attention(q, k, vv).transpose(1, 2).reshape(n, T, D))

    def cross_attn(a, v, cond):
        n, T, _ = v.shape
        q = lin(a.q, v).reshape(n, T, H, D // H).transpose(1, 2)
        k, vv = lin(a.kv, cond).reshape(n, cond.shape[1], 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        return lin(a.proj, F.scaled_dot_product_attention(q, k, vv).transpose(1, 2).reshape(n, T, D))

    def mlp(mm, v):
        return lin(mm.fc2, F.gelu(lin(mm.fc1, v), approximate="tanh"))

    p = m.patch_size
    x = F.conv2d(x, m.x_embedder.proj.weight, m.x_embedder.proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = x + m.pos_embed
    tm = m.t_embedder.mlp
    te = type(m.t_embedder).timestep_embedding(t, 256).to(tm[0].weight.dtype)
    te = lin(tm[2], F.silu(lin(tm[0], te)))
    ye = F.embedding(y, m.y_embedder.embedding_table.weight)  # eval mode: no label dropout
    T = x.shape[1]
    if m.block == "in-context":
        x = torch.cat([x, te.unsqueeze(1), ye.unsqueeze(1)], dim=1)
    c = torch.stack([te, ye], dim=1) if m.block == "cross-attention" else te + ye
    for b in m.blocks:
        if m.block == "adaLN-Zero":
            s1, c1, g1, s2, c2, g2 = lin(b.adaLN_modulation[1], F.silu(c)).chunk(6, dim=1)
            x = x + g1.unsqueeze(1) * attn(b.attn, modulate(norm(x, b.norm1), s1, c1))
            x = x + g2.unsqueeze(1) * mlp(b.mlp, modulate(norm(x, b.norm2), s2, c2))
        elif m.block == "adaLN":
            s1, c1, s2, c2 = lin(b.adaLN_modulation[1], F.silu(c)).chunk(4, dim=1)
            x = x + attn(b.attn, modulate(norm(x, b.norm1), s1, c1))
            x = x + mlp(b.mlp, modulate(norm(x, b.norm2), s2, c2))
        else:
            x = x + attn(b.attn, norm(x, b.norm1))
            if m.block == "cross-attention":
                x = x + cross_attn(b.cross_attn, norm(x, b.norm_cross), c)
            x = x + mlp(b.mlp, norm(x, b.norm2))
    x = x[:, :T]
    fl = m.final_layer
    if fl.adaptive:
        shift, scale = lin(fl.adaLN_modulation[1], F.silu(c)).chunk(2, dim=1)
        x = modulate(norm(x, fl.norm_final), shift, scale)
    else:
        x = norm(x, fl.norm_final)
    x = lin(fl.linear, x)
    h = w = int(T ** 0.5)
    x = x.reshape(N, h, w, p, p, m.out_channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, m.out_channels, h * p, w * p)


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.slow
def test_reference_backend_is_the_official_math_and_fused_is_close(block):
    model = make_model(block, dict(S2, depth=3))
    x, t, y = make_inputs(3)
    with torch.no_grad():
        official = official_forward(model, x, t, y)
        with dit_fast.use_backend("reference"):
            assert torch.equal(model(x, t, y), official)
    # the fused default path: forward and every parameter gradient
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(official.shape, generator=g)
    (official_forward(model, x, t, y) * w).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    out, grads = run(model, "auto", x, t, y)
    torch.testing.assert_close(out, official, atol=1e-5, rtol=1e-5)
    for name, got in grads.items():
        assert rel_err(got, want[name]) < FP32_GRAD_REL, name


# ---- fused (default) path vs reference --------------------------------------------------------

def check_against_reference(model, backend, x, t, y):
    """Runs `backend` and the reference on the same model and inputs and compares outputs and all
    parameter gradients (fp32: tight tolerance; bf16: the error rule of the module docstring).
    Returns the output."""
    dtype = x.dtype
    out, grads = run(model, backend, x, t, y)
    ref_out, ref_grads = run(model, "reference", x, t, y)
    assert out.dtype == dtype and set(grads) == set(ref_grads)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for name, g in grads.items():
            assert rel_err(g, ref_grads[name]) < FP32_GRAD_REL, name
        return out
    # bf16: compare both paths with a float64 run of the reference (same bf16-rounded weights)
    truth_out, truth_grads = run(copy.deepcopy(model).double(), "reference", x.double(), t, y)
    # relative errors (max_ref 1); c = 0.5: one rounding to bf16 (both paths measured 1-3 eps)
    floor = error_floor(1.0, dtype, model.pos_embed.shape[-1], 0.5)  # K: the hidden size
    e, e_ref = rel_err(out, truth_out), rel_err(ref_out, truth_out)
    assert e <= 1.5 * e_ref + floor, f"output: fused {e:.3g} vs reference {e_ref:.3g}"
    for name, g in grads.items():
        e, e_ref = rel_err(g, truth_grads[name]), rel_err(ref_grads[name], truth_grads[name])
        assert e <= 1.5 * e_ref + floor, f"{name}: fused {e:.3g} vs reference {e_ref:.3g}"
    return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_fused_forward_backward_match_reference(block, dtype, batch):
    model = make_model(block).to(dtype)
    x, t, y = make_inputs(batch)
    out = check_against_reference(model, "auto", x.to(dtype), t, y)
    assert out.shape == (batch, 8, 6, 6)


class _OpRecorder(TorchDispatchMode):
    """Counts the ops dispatched (custom ops appear by name: dit_fast::...), and the output shapes
    (rows, width) of the GEMMs with a bias (addmm: the Linear layers; the fused fc1 has none)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.gemms = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name()
        self.ops[name] += 1
        if name == "aten::addmm":
            self.gemms[tuple(out.shape)] += 1
        return out


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_default_path_dispatches_the_fused_ops(block):
    model = make_model(block)
    depth, D = S2["depth"], S2["hidden_size"]
    N = 3  # the adaLN GEMMs have one row per sample (the others one per token)
    rec = _OpRecorder()
    with torch.no_grad(), rec:
        model(*make_inputs(N))
    ops = rec.ops
    for name in ("patch_embed", "timestep_embedding", "unpatchify"):
        assert ops[f"dit_fast::{name}"] == 1, (name, ops)
    assert ops["dit_fast::attention"] == depth and ops["dit_fast::gelu_bias"] == depth
    assert ops["aten::convolution"] == 0 and ops["aten::gelu"] == 0
    if block in ("adaLN-Zero", "adaLN"):
        k = 6 if block == "adaLN-Zero" else 4
        # one ln_modulate (block 0's norm1); every other norm is fused with the residual before it
        assert ops["dit_fast::ln_modulate"] == 1
        assert ops["dit_fast::gated_residual_ln_modulate"] == 2 * depth
        assert ops["dit_fast::gated_residual"] == 0 and ops["aten::native_layer_norm"] == 0
        # all adaLN projections in ONE GEMM: width depth * kD + 2D (the final layer's)
        assert rec.gemms[N, depth * k * D + 2 * D] == 1
        assert rec.gemms[N, k * D] == 0 and rec.gemms[N, 2 * D] == 0
    # under the reference backend: the official per-layer adaLN GEMMs, no fused residual ops
    rec = _OpRecorder()
    with torch.no_grad(), rec, dit_fast.use_backend("reference"):
        model(*make_inputs(N))
    if block in ("adaLN-Zero", "adaLN"):
        assert rec.gemms[N, depth * k * D + 2 * D] == 0
        assert rec.gemms[N, k * D] == depth and rec.gemms[N, 2 * D] == 1


# ---- explicit backends ------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_C, reason="dit_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_forced_cpu_backend(dtype, monkeypatch):
    """use_backend("cpu"): every op of the model has a C++ kernel (a forced backend raises if not)."""
    model = make_model("adaLN-Zero").to(dtype)
    x, t, y = make_inputs(3)
    x = x.to(dtype)
    with torch.no_grad(), dit_fast.use_backend("cpu"):
        eager = model(x, t, y)  # eager inference: the kernels called directly
        monkeypatch.setenv("DIT_FAST_CPU_GEMM", "0")  # torch's GEMMs, as training runs them
        eager_torch_gemms = model(x, t, y)
    out = check_against_reference(model, "cpu", x, t, y)
    assert torch.equal(eager_torch_gemms, out)  # the same kernels with and without the autograd layers
    # with our GEMMs: another summation order (bf16: the per-dtype table, whichever GEMMs this CPU has)
    torch.testing.assert_close(eager, out, **(tol(dtype) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)))


TINY_TRITON = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=1,
                   num_classes=10)  # head dim 64: one of the Triton attention kernel's


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1 "
                    "without a GPU (the GPU run of the Triton backend is untested here)")
@pytest.mark.slow
def test_forced_triton_backend_interpreter():
    """use_backend("triton") on CPU tensors under Triton's interpreter: every op of the model runs
    its Triton kernel (tiny shapes: the interpreter is slow)."""
    model = make_model("adaLN-Zero", TINY_TRITON)
    x, t, y = make_inputs(3, TINY_TRITON)
    with torch.no_grad(), dit_fast.use_backend("triton"):
        eager = model(x, t, y)
    out = check_against_reference(model, "triton", x, t, y)
    torch.testing.assert_close(eager, out, atol=1e-5, rtol=1e-5)


# ---- torch.compile ----------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_fullgraph_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of the fused model (forward + backward: one AOT-autograd
    graph), with the NVTX ranges switched on (they must not break the graph)."""
    pushed = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    monkeypatch.setattr(nvtx, "_enabled", True)
    torch._dynamo.reset()
    model = make_model("adaLN-Zero")
    x, t, y = make_inputs(3)
    out, grads = run(model, "auto", x, t, y)
    compiled = torch.compile(model, fullgraph=True)
    c_out, c_grads = run(compiled, "auto", x, t, y)
    torch.testing.assert_close(c_out, out, atol=1e-5, rtol=1e-5)
    for name, g in c_grads.items():
        assert rel_err(g, grads[name.removeprefix("_orig_mod.")]) < FP32_GRAD_REL, name
    assert "dit.block0" in pushed  # the eager run emitted ranges (the compiled one skips them)


# ---- AdaLNPack inside the model ---------------------------------------------------------------

@pytest.mark.slow
def test_adaln_pack_follows_parameter_updates():
    """The stacked adaLN weight is cached between calls; optimizer steps, load_state_dict and .to()
    must all be seen by the next forward."""
    model = make_model("adaLN-Zero")
    x, t, y = make_inputs(3)

    def check():
        with torch.no_grad():
            fused = model(x, t, y)
            with dit_fast.use_backend("reference"):
                ref = model(x, t, y)
        assert rel_err(fused, ref) < 1e-6
        return fused

    before = check()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run(model, "auto", x, t, y)
    opt.step()
    after = check()
    assert rel_err(after, before) > 1e-3  # a stale pack would fail check() by about this much
    model.load_state_dict(make_model("adaLN-Zero", seed=7).state_dict())
    check()
    model.to(torch.float64)
    x = x.double()
    check()
    # a deep copy (e.g. an EMA model) has its own pack, following its own parameters
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.blocks[1].adaLN_modulation[1].parameters():
            p.mul_(0.5)
        with dit_fast.use_backend("reference"):
            ref = ema(x, t, y)
        assert rel_err(ema(x, t, y), ref) < 1e-6  # (the timestep embedding is fp32 math)
        assert rel_err(model(x, t, y), ref) > 1e-3


# ---- NVTX -------------------------------------------------------------------------------------

def test_nvtx_ranges_around_blocks_and_ops(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append(("pop", None)))
    model = make_model("adaLN-Zero")
    x, t, y = make_inputs(1)
    with torch.no_grad():
        model(x, t, y)
    assert events == []  # off by default: nothing emitted
    monkeypatch.setattr(nvtx, "_enabled", True)
    with torch.no_grad():
        model(x, t, y)
    names = [n for kind, n in events if kind == "push"]
    depth = 0
    for kind, _ in events:  # balanced and properly nested
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0
    for name in ("dit.embed", "dit.block0", "dit.block1", "dit.final", "attn", "mlp",
                 "dit_fast.patch_embed", "dit_fast.timestep_embedding", "dit_fast.AdaLNPack",
                 "dit_fast.ln_modulate", "dit_fast.attention_qkv", "dit_fast.linear_gelu",
                 "dit_fast.gated_residual_ln_modulate", "dit_fast.unpatchify"):
        assert name in names, (name, names)
    assert names.count("dit_fast.gated_residual_ln_modulate") == 2 * S2["depth"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_nvtx_is_off_without_cuda():
    assert nvtx.enable() is False and nvtx.enabled() is False
    assert nvtx.range("x") is nvtx.range("y")  # the shared null context
