"""dit_fast.ops.adaln: the batched adaLN projections (AdaLNPack) and the fused sinusoidal timestep
embedding, every available backend against the official code / PyTorch reference."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from dit_fast import _backends
from dit_fast._backends import use_backend
from dit_fast.ops import AdaLNPack, adaln_modulation_ref, timestep_embedding, timestep_embedding_ref
from op_helpers import BACKEND_DEVICES, HAS_C, require

A = importlib.import_module("dit_fast.ops.adaln")
OP = A.OP_TIMESTEP_EMBEDDING


def official(t, dim, max_period=10000):
    """TimestepEmbedder.timestep_embedding of the drop-in model (the official code)."""
    from dit_fast.models.dit import TimestepEmbedder
    return TimestepEmbedder.timestep_embedding(t, dim, max_period)


# ---- timestep embedding -----------------------------------------------------------------------

T_CASES = {
    "int64": torch.tensor([0, 1, 999, 500, 37, 250]),
    "int32": torch.tensor([0, 3, 998], dtype=torch.int32),
    "float32": torch.tensor([0.5, 998.25, 3.0, 1e-3]),
    "float64": torch.tensor([0.25, 123.456, 999.0], dtype=torch.float64),
    "batch1": torch.tensor([999]),
}


@pytest.mark.parametrize("dim", [256, 255, 2, 3, 72])
@pytest.mark.parametrize("tcase", list(T_CASES))
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_timestep_embedding_matches_official(backend, device, tcase, dim):
    require(OP, backend, device)
    t = T_CASES[tcase].to(device)
    with use_backend(backend):
        out = timestep_embedding(t, dim)
    want = official(t, dim)
    assert out.shape == want.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)  # float32 cos/sin: <= 1 ulp apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64],
                         ids=["bfloat16", "float16", "float64"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_timestep_embedding_output_dtype(backend, device, dtype):
    """dtype= fuses `.to(model dtype)`: the float32 embedding rounded once."""
    require(OP, backend, device, dtype)
    t = T_CASES["int64"].to(device)
    with use_backend(backend):
        out = timestep_embedding(t, 256, dtype=dtype)
    assert out.dtype == dtype
    want = official(t, 256)
    if dtype == torch.float64:
        torch.testing.assert_close(out, want.double(), rtol=0, atol=1e-6)
    else:  # the float32 values may differ by 1 ulp, which can flip one rounding: <= 1 ulp of dtype
        torch.testing.assert_close(out.float(), want.to(dtype).float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_timestep_embedding_max_period_and_strided_t(backend, device):
    require(OP, backend, device)
    t = torch.arange(0, 40, device=device)[::7]  # non-contiguous
    with use_backend(backend):
        out = timestep_embedding(t, 64, max_period=100)
    torch.testing.assert_close(out, official(t, 64, 100), rtol=0, atol=1e-6)


def test_timestep_embedding_grad_wrt_float_t():
    t = torch.tensor([0.5, 3.25, 100.0], dtype=torch.float64, requires_grad=True)
    t2 = t.detach().clone().requires_grad_()
    g = torch.randn(3, 16, dtype=torch.float32)
    (timestep_embedding(t, 16) * g).sum().backward()
    (official(t2, 16) * g).sum().backward()
    torch.testing.assert_close(t.grad, t2.grad, rtol=1e-4, atol=1e-4)


def test_timestep_embedding_in_model():
    """Drop-in for TimestepEmbedder.forward (bf16 model: the embedding is cast to the weights' dtype)."""
    from dit_fast.models.dit import TimestepEmbedder
    emb = TimestepEmbedder(72)
    t = torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(emb.mlp(timestep_embedding(t, 256)), emb(t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck_timestep_embedding(backend, device):
    require(OP, backend, device)
    t = torch.tensor([1, 500, 999], device=device)
    freqs = A._freqs(16, 10000, t.device)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.dit_fast.timestep_embedding.default,
                              (t, freqs, 16, torch.float32))
        tf = torch.tensor([0.5, 3.0], device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.dit_fast.timestep_embedding.default,
                              (tf, A._freqs(15, 10000, t.device), 15, torch.float32))


@pytest.mark.skipif(not HAS_C, reason="dit_fast._C not built")
def test_opcheck_native_timestep_embedding():
    freqs = A._freqs(16, 10000, torch.device("cpu"))
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        torch.library.opcheck(torch.ops.dit_fast.timestep_embedding_fwd.default,
                              (torch.tensor([1, 2]), freqs, 16, dt))
    with pytest.raises(RuntimeError, match="freqs must have shape"):
        torch.ops.dit_fast.timestep_embedding_fwd(torch.tensor([1]), freqs[:3], 16, torch.float32)
    with pytest.raises(RuntimeError, match="t has unsupported dtype"):
        torch.ops.dit_fast.timestep_embedding_fwd(torch.tensor([True]), freqs, 16, torch.float32)


def test_timestep_embedding_compile_fullgraph():
    compiled = torch.compile(lambda t: timestep_embedding(t, 32) * 2, fullgraph=True,
                             backend="aot_eager")
    t = torch.tensor([3, 999])
    torch.testing.assert_close(compiled(t), official(t, 32) * 2, rtol=0, atol=2e-6)


@pytest.mark.parametrize("match,args,kwargs", [
    ("t must be a torch.Tensor", ([1, 2],), {}),
    ("t must be 1-D", (torch.zeros(2, 2),), {}),
    ("t must be float32/float64/int32/int64", (torch.zeros(2, dtype=torch.bool),), {}),
    ("dim must be an int >= 2", (torch.zeros(2),), {"dim": 1}),
    ("max_period must be a positive number", (torch.zeros(2),), {"max_period": -1}),
    ("dtype must be a floating-point", (torch.zeros(2),), {"dtype": torch.int32}),
])
def test_timestep_embedding_invalid_inputs(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        timestep_embedding(*args, **kwargs)


def test_timestep_embedding_auto_backend():
    out = torch.empty(0)
    assert _backends.select(OP, out) == ("cpu" if HAS_C else "reference")
    assert _backends.select(OP, out.half()) == "reference"


# ---- AdaLNPack ----------------------------------------------------------------------------------

def tiny_dit(**kw):
    from dit_fast.models import DiT
    cfg = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=72, depth=3, num_heads=2,
               num_classes=10)
    cfg.update(kw)
    model = DiT(**cfg)
    with torch.no_grad():
        for blk in model.blocks:  # adaLN-Zero starts at zero: make the projections non-trivial
            blk.adaLN_modulation[1].weight.normal_(std=0.05)
            blk.adaLN_modulation[1].bias.normal_(std=0.05)
    return model


def linears(model):
    return [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]


def aliased(lins):
    """Whether the weights and biases of `lins` are consecutive views of one buffer each."""
    return all(A._stack_view(ps) is not None
               for ps in ([l.weight for l in lins], [l.bias for l in lins]))


def test_pack_matches_each_block():
    model = tiny_dit()
    pack = AdaLNPack(linears(model))
    c = torch.randn(2, 72)
    with torch.no_grad():
        outs = pack(c)
        refs = [blk.adaLN_modulation(c) for blk in model.blocks] + [model.final_layer.adaLN_modulation(c)]
    assert [o.shape for o in outs] == [(2, 6 * 72)] * 3 + [(2, 2 * 72)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    # the chunks are strided views that ln_modulate reads in place
    assert outs[0].stride() == (6 * 72 * 3 + 2 * 72, 1)


def test_parameters_are_views_of_one_buffer():
    """A DiT's adaLN weights and biases live in one stacked buffer each from construction on;
    state_dict keys and values are those of independent parameters."""
    lins = [nn.Linear(6, 12), nn.Linear(6, 4)]
    before = {k: v.clone() for k, v in nn.ModuleList(lins).state_dict().items()}
    assert not aliased(lins)
    AdaLNPack(lins)
    assert aliased(lins)
    assert lins[1].weight.data_ptr() == lins[0].weight.data_ptr() + 12 * 6 * 4
    assert lins[1].weight.untyped_storage().data_ptr() == lins[0].weight.untyped_storage().data_ptr()
    after = nn.ModuleList(lins).state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k])
    model = tiny_dit()
    assert aliased(linears(model))
    assert all(type(p) is nn.Parameter for lin in linears(model) for p in lin.parameters())


def test_pack_follows_every_weight_change():
    """Nothing is cached: in-place edits, writes through .data, load_state_dict, re-pointed
    parameters and dtype changes are all seen by the next call."""
    model = tiny_dit()
    lins = linears(model)
    pack = AdaLNPack(lins)
    c = torch.randn(2, 72)

    def check(c=c):
        with torch.no_grad():
            for o, r in zip(pack(c), adaln_modulation_ref(c, lins)):
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():
        lins[1].weight.add_(0.5)                          # in-place edit
    check()
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})
    check()
    lins[0].weight.data.fill_(0.25)                       # through .data (diffusers' EMAModel)
    check()
    lins[2].bias.data = torch.randn(6 * 72)               # re-pointed: re-aliased at the next call
    assert not aliased(lins)
    check()
    assert aliased(lins)
    model.double()                                        # .to(dtype)
    check(c.double())
    assert aliased(lins)


@pytest.mark.parametrize("grad_c", [True, False], ids=["c-grad", "c-const"])
def test_pack_gradients_reach_each_block(grad_c):
    model = tiny_dit()
    ref_model = copy.deepcopy(model)
    pack = AdaLNPack(linears(model))
    c = torch.randn(2, 72, requires_grad=grad_c)
    c_ref = c.detach().clone().requires_grad_(grad_c)
    gs = [torch.randn(2, l.out_features) for l in linears(model)]
    sum((o * g).sum() for o, g in zip(pack(c), gs)).backward()
    sum((o * g).sum() for o, g in zip(adaln_modulation_ref(c_ref, linears(ref_model)), gs)).backward()
    if grad_c:
        torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-5, atol=1e-5)  # summation order
    for l, r in zip(linears(model), linears(ref_model)):
        torch.testing.assert_close(l.weight.grad, r.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l.bias.grad, r.bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adamw-foreach", "adamw-fused", "adamw-for-loop"])
def test_pack_training_steps_write_the_buffer(opt):
    """Optimizer steps update the parameters in place, i.e. the stacked buffer: no copy per step
    and no rebuild, and the model matches an unaliased copy trained the same way."""
    model = tiny_dit()
    ref = copy.deepcopy(model)
    for lin in linears(ref):  # an independent copy of every parameter (no aliasing)
        lin.weight = nn.Parameter(lin.weight.detach().clone())
        lin.bias = nn.Parameter(lin.bias.detach().clone())
    assert aliased(linears(model)) and not aliased(linears(ref))
    lins = linears(model)
    ptr = lins[0].weight.data_ptr()

    def make(m):
        if opt == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.1)
        kind = opt.split("-", 1)[1]
        return torch.optim.AdamW(m.parameters(), lr=0.05, foreach=kind == "foreach",
                                 fused=True if kind == "fused" else None)

    opts = [make(model), make(ref)]
    c = torch.randn(2, 72)
    for _ in range(2):
        for m, o in zip((model, ref), opts):
            o.zero_grad()
            sum(out.square().sum() for out in A.adaln_projections(c, linears(m))).backward()
            o.step()
    assert lins[0].weight.data_ptr() == ptr and aliased(lins)
    for l, r in zip(lins, linears(ref)):
        torch.testing.assert_close(l.weight, r.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(l.bias, r.bias, rtol=1e-6, atol=1e-7)


def test_pack_survives_deepcopy():
    """A deep copy (e.g. an EMA model) has its own buffer, aliased by its own parameters."""
    model = tiny_dit()
    c = torch.randn(2, 72)
    ema = copy.deepcopy(model)
    assert aliased(linears(ema))
    assert linears(ema)[0].weight.data_ptr() != linears(model)[0].weight.data_ptr()
    with torch.no_grad():
        for p in linears(ema)[1].parameters():
            p.mul_(0.5)
        torch.testing.assert_close(A.adaln_projections(c, linears(ema))[1],
                                   ema.blocks[1].adaLN_modulation(c))
        torch.testing.assert_close(A.adaln_projections(c, linears(model))[1],
                                   model.blocks[1].adaLN_modulation(c))


def test_pack_leaves_unaliasable_parameters_alone():
    """Tensors that are not the layers' own nn.Parameters (torch.func.functional_call) are read
    with a torch.cat per call, never re-pointed."""
    module = _PackModule(nn.ModuleList([nn.Linear(6, 12), nn.Linear(6, 4)]))
    AdaLNPack(list(module.lins))
    c = torch.randn(3, 6)
    new = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in new.items()}
    with torch.no_grad():
        got = torch.func.functional_call(module, new, (c,))
    s = torch.nn.functional.silu(c)
    for i, g in enumerate(got):
        torch.testing.assert_close(g, s @ new[f"lins.{i}.weight"].T + new[f"lins.{i}.bias"])
    assert {k: v.data_ptr() for k, v in new.items()} == ptrs
    assert aliased(list(module.lins))  # the module's own parameters are back, still aliased


class _PackModule(nn.Module):
    def __init__(self, lins):
        super().__init__()
        self.lins = lins

    def forward(self, c):
        return A.adaln_projections(c, list(self.lins))


def test_pack_under_autocast_and_bf16():
    model = tiny_dit().to(torch.bfloat16)
    pack = AdaLNPack(linears(model))
    c = torch.randn(2, 72, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(pack(c)[0], model.blocks[0].adaLN_modulation(c), rtol=2e-2, atol=2e-2)


def test_pack_compile_fullgraph():
    model = tiny_dit()
    pack = AdaLNPack(linears(model))
    compiled = torch.compile(lambda c: [o * 2 for o in pack(c)], fullgraph=True, backend="aot_eager")
    c = torch.randn(2, 72)
    with torch.no_grad():
        for o, r in zip(compiled(c), adaln_modulation_ref(c, linears(model))):
            torch.testing.assert_close(o, r * 2, rtol=1e-5, atol=1e-6)


def test_pack_inside_inference_mode_stays_trainable():
    """Re-aliasing under torch.inference_mode must not turn the parameters into inference
    tensors (a later training step would fail)."""
    lins = [nn.Linear(6, 12), nn.Linear(6, 4)]
    pack = AdaLNPack(lins)
    lins[0].weight.data = lins[0].weight.detach().clone()
    with torch.inference_mode():
        pack(torch.randn(2, 6))
    assert aliased(lins) and not any(p.is_inference() for l in lins for p in l.parameters())
    sum(o.sum() for o in pack(torch.randn(2, 6))).backward()
    assert lins[0].weight.grad is not None


def test_pack_invalid_inputs():
    with pytest.raises(ValueError, match="linears must contain"):
        AdaLNPack([])
    with pytest.raises(ValueError, match=r"linears\[1\] must be an nn.Linear"):
        AdaLNPack([nn.Linear(4, 8), nn.Conv1d(4, 8, 1)])
    with pytest.raises(ValueError, match=r"linears\[1\] has in_features=5"):
        AdaLNPack([nn.Linear(4, 8), nn.Linear(5, 8)])
    with pytest.raises(ValueError, match="must have a bias"):
        AdaLNPack([nn.Linear(4, 8), nn.Linear(4, 8, bias=False)])
    pack = AdaLNPack([nn.Linear(4, 8), nn.Linear(4, 8)])
    with pytest.raises(ValueError, match=r"c must have shape \(N, 4\)"):
        pack(torch.zeros(2, 5))
    pack.linears[1].double()
    with pytest.raises(ValueError, match=r"linears\[1\].weight is torch.float64"):
        with torch.no_grad():
            pack(torch.zeros(2, 4))


def test_pack_gradcheck_float64():
    lins = [nn.Linear(6, 12).double(), nn.Linear(6, 4).double()]
    pack = AdaLNPack(lins)
    c = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: torch.cat(pack(c), dim=1), (c,))
