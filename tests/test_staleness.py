"""No cache goes stale: after a forward, every route by which a user changes weights makes the
next forward equal that of a fresh model loaded with the same weights, on the default (auto),
reference and forced cpu backends (the cpu backend runs the packed-weight CPU GEMM for the
Linears and the one-GEMM adaLN projections over the aliased buffer).

Routes: optimizer steps (SGD, AdamW foreach and fused), load_state_dict (in place and
assign=True), .to(), writes through param.data, `param.data = ...`, in-place edits under no_grad,
swapped submodules, deepcopy, diffusers' EMAModel (copy_to / store / restore, foreach or not),
torch.compile, DDP (gloo, one process) and a checkpoint round trip. And the CUDA-graph sampling
loop's capture key (LoopRunner), on CPU with a stand-in for the graph capture.
"""

import contextlib
import copy
import functools
import pickle

import pytest
import torch
import torch.nn as nn

import dit_fast
from dit_fast import _backends
from dit_fast.models import DiT
from dit_fast.ops.adaln import _stack_view

HAS_C = _backends._probe("cpu") is None
CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
           num_classes=10)
BACKENDS = ["auto", "reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not HAS_C, reason="dit_fast._C is not built"))]
# fp32, same code on both sides: only BLAS blocking / alignment can differ
TOL = dict(rtol=1e-5, atol=1e-5)


def backend(name):
    return contextlib.nullcontext() if name == "auto" else dit_fast.use_backend(name)


def randomize(model, seed, scale=0.1):
    """Every trained parameter random (adaLN-Zero starts at zero: all weights must matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # pos_embed stays the fixed sin-cos table
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def new_values(model, seed):
    """{name: a random tensor} for every trained parameter of `model`."""
    src = randomize(DiT(**CFG), seed)
    return {k: v.detach().to(model.pos_embed.dtype) for k, v in src.named_parameters() if v.requires_grad}


def assign_data(model, new):
    """param.data = new value (a fresh tensor) for every parameter named in `new`."""
    for name, p in model.named_parameters():
        if name in new:
            p.data = new[name].clone()


def make_model(seed=0):
    return randomize(DiT(**CFG), seed).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    # batch 4 x 16 tokens = 64 rows: the packed CPU GEMM serves the Linears (>= MIN_ROWS rows)
    return (torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 250, 500, 999]),
            torch.tensor([0, 3, 7, 9]))


def prime(model):
    """The forwards after which caches would exist: inference and a grad-enabled one."""
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    model(x, t, y)
    return out


def forward_matches_fresh(model, before=None):
    """model's next forward == a fresh DiT loaded with model's current weights; returns it. With
    `before`, also checks the route changed the output (so a stale cache would be caught)."""
    module = getattr(model, "_orig_mod", getattr(model, "module", model))
    fresh = DiT(**CFG).to(module.pos_embed.dtype).eval()
    fresh.load_state_dict(module.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        got, want = model(x, t, y), fresh(x, t, y)
    torch.testing.assert_close(got, want, **TOL)
    if before is not None:
        assert (got - before).abs().max() > 1e-2, "the route did not change the output"
    return got


@pytest.mark.skipif(not HAS_C, reason="dit_fast._C is not built")
@pytest.mark.parametrize("be", ["auto", "cpu"])
def test_cpu_linear_path_serves_these_models(be):
    """The routes below cover the CPU inference Linear path (dit_fast/ops/linear.py) too."""
    from dit_fast.ops.linear import cpu_linear_applies
    with backend(be), torch.no_grad():
        assert cpu_linear_applies(torch.zeros(64, 64), torch.zeros(64, 64), None)


def adaln_aliased(model):
    lins = [b.adaLN_modulation[1] for b in model.blocks] + [model.final_layer.adaLN_modulation[1]]
    return all(_stack_view(ps) is not None
               for ps in ([l.weight for l in lins], [l.bias for l in lins]))


# ---- routes -----------------------------------------------------------------------------------

def train_step(model, opt, seed=0):
    x, t, y = inputs()
    model.train()
    torch.manual_seed(seed)  # label dropout
    opt.zero_grad()
    model(x, t, y).square().mean().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("opt", ["sgd", "adamw-foreach", "adamw-fused"])
@pytest.mark.slow
def test_optimizer_steps(be, opt):
    with backend(be):
        model = make_model()
        before = prime(model)
        if opt == "sgd":
            o = torch.optim.SGD(model.parameters(), lr=0.5)
        else:
            fused = opt == "adamw-fused"
            o = torch.optim.AdamW(model.parameters(), lr=0.05, foreach=not fused, fused=fused or None)
        for step in range(2):
            train_step(model, o, step)
            before = forward_matches_fresh(model, before)
        assert adaln_aliased(model)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict(be, assign):
    with backend(be):
        model = make_model()
        before = prime(model)
        model.load_state_dict(make_model(seed=5).state_dict(), assign=assign)
        forward_matches_fresh(model, before)
        assert adaln_aliased(model)


@pytest.mark.parametrize("be", BACKENDS)
def test_to_dtype_and_back(be):
    """.to() gives every parameter new storage; new values arrive on the way."""
    with backend(be):
        model = make_model()
        before = prime(model)
        model.double()
        assert adaln_aliased(model)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        model.float()
        assert adaln_aliased(model)
        forward_matches_fresh(model, before)


@pytest.mark.parametrize("be", BACKENDS)
def test_writes_through_param_data(be):
    """param.data.copy_(...): what diffusers' EMAModel.copy_to does (no version counter bump)."""
    with backend(be):
        model = make_model()
        before = prime(model)
        new = new_values(model, 3)
        for name, p in model.named_parameters():
            if name in new:
                p.data.copy_(new[name])
        forward_matches_fresh(model, before)


@pytest.mark.parametrize("be", BACKENDS)
def test_param_data_assignment(be):
    """param.data = new: every parameter re-pointed (the adaLN views break and re-alias)."""
    with backend(be):
        model = make_model()
        before = prime(model)
        new = new_values(model, 4)
        assign_data(model, new)
        assert not adaln_aliased(model)
        forward_matches_fresh(model, before)
        assert adaln_aliased(model) == (be != "reference")  # re-aliased by the one-GEMM path


@pytest.mark.parametrize("be", BACKENDS)
def test_in_place_edits_under_no_grad(be):
    with backend(be):
        model = make_model()
        before = prime(model)
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        forward_matches_fresh(model, before)


@pytest.mark.parametrize("be", BACKENDS)
def test_swapped_submodules(be):
    """New layers (an adaLN projection, qkv, fc2, the final linear) are looked up at each call."""
    with backend(be):
        model = make_model()
        before = prime(model)
        D = CFG["hidden_size"]
        model.blocks[1].adaLN_modulation[1] = nn.Linear(D, 6 * D)
        model.blocks[0].attn.qkv = nn.Linear(D, 3 * D)
        model.blocks[1].mlp.fc2 = nn.Linear(4 * D, D)
        model.final_layer.linear = nn.Linear(D, model.final_layer.linear.out_features)
        model.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        for m in (model.blocks[1].adaLN_modulation[1], model.final_layer.adaLN_modulation[1]):
            nn.init.normal_(m.weight, std=0.1)
            nn.init.normal_(m.bias, std=0.1)
        before = forward_matches_fresh(model, before)
        assert adaln_aliased(model) == (be != "reference")  # re-aliased by the one-GEMM path
        # a replacement that is not a plain Linear (e.g. a LoRA-style wrapper) runs as it is

        class Scaled(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        lin = Scaled(D, 6 * D)
        lin.load_state_dict(model.blocks[0].adaLN_modulation[1].state_dict())
        model.blocks[0].adaLN_modulation[1] = lin
        x, t, y = inputs()
        with torch.no_grad():
            got = model(x, t, y)
            with dit_fast.use_backend("reference"):  # the official per-layer expressions
                want = model(x, t, y)
        torch.testing.assert_close(got, want, **TOL)
        assert (got - before).abs().max() > 1e-2


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy(be, how):
    """A deep copy (an EMA model) or an unpickled model has its own aliased buffer; each follows
    its own weights."""
    with backend(be):
        model = make_model()
        before = prime(model)
        ema = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
        assert adaln_aliased(ema)
        with torch.no_grad():
            for p in ema.parameters():
                if p.requires_grad:
                    p.mul_(0.5)
        forward_matches_fresh(ema, before)
        torch.testing.assert_close(forward_matches_fresh(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.slow
def test_diffusers_ema_model(be, foreach):
    """diffusers' EMAModel: store, copy_to (EMA weights in), restore (training weights back)."""
    from diffusers.training_utils import EMAModel

    with backend(be):
        model = make_model()
        prime(model)
        ema = EMAModel(model.parameters(), decay=0.9, foreach=foreach)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for step in range(3):
            train_step(model, opt, step)
            ema.step(model.parameters())
        trained = forward_matches_fresh(model)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        for p, s in zip(model.parameters(), ema.shadow_params):
            assert torch.equal(p, s)
        forward_matches_fresh(model, trained)
        ema.restore(model.parameters())
        torch.testing.assert_close(forward_matches_fresh(model), trained, rtol=0, atol=0)


@pytest.mark.parametrize("be", BACKENDS)
def test_torch_compile(be):
    """A compiled model after in-place edits, re-pointed parameters and a swapped layer."""
    with backend(be):
        model = make_model()
        compiled = torch.compile(model, backend="aot_eager")
        before = prime(model)
        x, t, y = inputs()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, y), before, **TOL)
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
        before = forward_matches_fresh(compiled, before)
        new = new_values(model, 8)
        assign_data(model, new)
        before = forward_matches_fresh(compiled, before)
        D = CFG["hidden_size"]
        model.blocks[0].adaLN_modulation[1] = nn.Linear(D, 6 * D)
        nn.init.normal_(model.blocks[0].adaLN_modulation[1].weight, std=0.2)
        forward_matches_fresh(compiled, before)


@pytest.fixture(scope="module")
def gloo():
    import tempfile

    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("be", BACKENDS)
def test_ddp_training(be, gloo):
    """DDP over the aliased parameters (gloo, one process): the same updates as without DDP, and
    the next forward sees them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    with backend(be):
        model = make_model()
        plain = copy.deepcopy(model)
        before = prime(model)
        ddp = DDP(model)
        assert adaln_aliased(model)
        opts = [torch.optim.AdamW(m.parameters(), lr=0.05, foreach=True) for m in (ddp, plain)]
        for step in range(2):
            train_step(ddp, opts[0], step)
            train_step(plain, opts[1], step)
        assert adaln_aliased(model)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
        forward_matches_fresh(ddp, before)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(be, suffix, tmp_path):
    """save_checkpoint writes the current (aliased) weights as independent tensors."""
    from dit_fast.checkpoint import from_pretrained, save_checkpoint

    with backend(be):
        model = make_model()
        before = prime(model)
        with torch.no_grad():
            model.blocks[1].adaLN_modulation[1].weight.add_(0.3)
        save_checkpoint(model, tmp_path / f"m{suffix}")
        loaded = from_pretrained(tmp_path / f"m{suffix}", num_heads=CFG["num_heads"])
        assert adaln_aliased(loaded)
        x, t, y = inputs()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t, y), forward_matches_fresh(model, before), **TOL)
    if suffix == ".pt":
        sd = torch.load(tmp_path / f"m{suffix}", weights_only=True)
        w = sd["blocks.0.adaLN_modulation.1.weight"]
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size()  # one tensor per storage


# ---- CUDA-graph sampling loops: the capture key ------------------------------------------------

def test_loop_runner_key_follows_weight_identity():
    """LoopRunner recaptures its CUDA graph when its key changes: re-pointed weights must change
    it (the graph would read the old memory), in-place updates must not (the graph reads them)."""
    from dit_fast.sampling.loops import LoopRunner, make_sampler

    model = make_model()
    runner = LoopRunner(model.forward_with_cfg, make_sampler("ddim", 2))
    x, kw = torch.randn(2, 4, 8, 8), dict(y=torch.tensor([1, 10]), cfg_scale=4.0)
    key = runner._key(x, kw)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)
        model.load_state_dict(make_model(seed=2).state_dict())
    assert runner._key(x, kw) == key
    changes = {
        "param.data =": lambda: setattr(model.blocks[1].mlp.fc1.weight, "data",
                                        model.blocks[1].mlp.fc1.weight.detach().clone()),
        "assign": lambda: model.load_state_dict(make_model(seed=3).state_dict(), assign=True),
        "swap": lambda: setattr(model.blocks[0].adaLN_modulation, "1", nn.Linear(64, 384)),
        "adaLN re-aliased": lambda: prime(model),
        "to": lambda: model.double(),
        "train": lambda: model.train(),
    }
    for name, change in changes.items():
        change()
        new = runner._key(x, kw)
        assert new != key, name
        key = new
    model.float()
    for wrapped in (lambda x, t, **k: model.forward_with_cfg(x, t, **k),
                    functools.partial(DiT.forward_with_cfg, model),
                    torch.compile(model, backend="aot_eager")):
        wrapped_runner = LoopRunner(wrapped, make_sampler("ddim", 2))
        key = wrapped_runner._key(x, kw)
        model.pos_embed.data = model.pos_embed.detach().clone()
        assert wrapped_runner._key(x, kw) != key


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay() reruns the step on the static buffers
    with the weight tensors as they were at capture (their memory: in-place writes are seen,
    re-pointed parameters are not), as a captured graph does."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def test_loop_runner_recaptures_after_weights_move(monkeypatch):
    """The runner's graph path on CPU, with a stand-in capture that reads the memory the weights
    had at capture: after `param.data = ...` it must recapture (else it samples with the old
    weights); after an in-place load_state_dict it replays and sees the new values."""
    from dit_fast.sampling.loops import LoopRunner, make_sampler, sample_loop

    model = make_model()
    sampler = make_sampler("ddim", 3)
    runner = LoopRunner(model, sampler)
    captures = []

    def capture(x, kwargs):
        captures.append(1)
        frozen = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
        g = dict(x=x.clone(), i=torch.zeros(x.shape[0], dtype=torch.long), noise=torch.zeros_like(x),
                 state={k: v.clone() for k, v in runner.stepper.init_state(x).items()},
                 kwargs={k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
                 out_x=torch.zeros_like(x))
        g["out_state"] = {k: v.clone() for k, v in g["state"].items()}
        runner._kwargs = g["kwargs"]

        def step():
            live = runner.model
            runner.model = lambda *a, **k: torch.func.functional_call(model, frozen, a, k)
            try:
                out_x, out_state = runner._step(g["x"], g["i"], g["noise"], g["state"])
            finally:
                runner.model = live
            g["out_x"].copy_(out_x)
            for k, v in out_state.items():
                g["out_state"][k].copy_(v)

        g["graph"] = _EagerGraph(step)
        runner._graph = g

    monkeypatch.setattr(runner, "_capture", capture)
    noise, kw = torch.randn(2, 4, 8, 8), dict(y=torch.tensor([1, 2]))

    def check(captured):
        torch.manual_seed(0)
        with torch.no_grad():
            got = runner._run_graph(noise, kw, sampler.step_indices())
        torch.manual_seed(0)
        want = sample_loop(model, noise.shape, sampler, noise=noise.clone(), model_kwargs=kw)
        torch.testing.assert_close(got, want, **TOL)
        assert len(captures) == captured

    check(1)
    check(1)  # same weights: replayed
    with torch.no_grad():
        model.load_state_dict(make_model(seed=9).state_dict())  # in place: replayed, and seen
    check(1)
    new = new_values(model, 10)
    assign_data(model, new)  # re-pointed: recaptured
    check(2)
