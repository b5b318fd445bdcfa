"""The forecasting cache (dit_fast.sampling.TaylorCache)."""
import pytest
import torch

from dit_fast import DiT
from dit_fast.sampling import SAMPLERS, LoopRunner, TaylorCache, make_sampler, sample_loop

FEATURES = ("output", "final", "blocks")


def _model(block="adaLN-Zero", depth=3, seed=0, dtype=torch.float32, in_channels=4):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=depth, num_heads=2,
            num_classes=6, block=block).eval()
    with torch.no_grad():          # leave the zero-initialized adaLN-Zero state: blocks must matter
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _sample(fn, sampler, z, y, cfg=None, seed=7):
    kw = dict(y=y) if cfg is None else dict(y=y, cfg_scale=cfg, guide_channels="all")
    torch.manual_seed(seed)
    return LoopRunner(fn, sampler, clip_denoised=True)(z, kw)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("cfg", [None, 3.0])
def test_interval_one_is_the_uncached_sampler_exactly(sampler, features, cfg):
    m = _model()
    s = make_sampler(sampler, 6)
    z = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 4])
    if cfg is not None:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 6)])
    cache = TaylorCache(m, 6, interval=1, order=2, features=features)
    fn = (lambda n: n.forward_with_cfg) if cfg is not None else (lambda n: n.forward)
    plain = _sample(fn(m), s, z, y, cfg)
    cached = _sample(fn(cache), s, z, y, cfg)
    assert torch.equal(cached, plain)
    assert cache.num_full == 6 and cache.num_forecast == 0


def test_schedule():
    m = _model()
    c = TaylorCache(m, 12, interval=4, first_steps=2, last_steps=1)
    assert [s for s, full in enumerate(c.schedule()) if full] == [0, 1, 5, 9, 11]
    c = TaylorCache(m, 12, interval=3, first_steps=1, last_steps=0)
    assert [s for s, full in enumerate(c.schedule()) if full] == [0, 3, 6, 9]
    assert all(TaylorCache(m, 5, interval=1).schedule())


def _x0_eps(cache, t):
    """(sqrt(abar_t), sqrt(1 - abar_t)) as the cache reads them."""
    return cache._schedule(t, torch.empty(0))


def test_output_features_forecast_x0_by_taylor_expansion():
    """Two full steps, then forecasts: x0 = x0(1) + k (x0(1) - x0(0)) (order 1, h = 1), and eps
    re-derived from the current x; order 0 reuses x0(1)."""
    m = _model()
    y = torch.tensor([0, 5])
    xs = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    ts = [torch.full((2,), v) for v in (900, 850, 800, 750)]
    for order in (0, 1, 2):
        cache = TaylorCache(m, 10, interval=100, order=order, first_steps=2, last_steps=0, features="output")
        with torch.no_grad():
            outs = [cache(x, t, y) for x, t in zip(xs, ts)]
            x0 = []
            for x, t in zip(xs[:2], ts[:2]):
                a, s = _x0_eps(cache, t)
                x0.append((x - s * m(x, t, y)[:, :4]) / a)
            var = [m(x, t, y)[:, 4:] for x, t in zip(xs[:2], ts[:2])]
        for k, (x, t, out) in enumerate(zip(xs[2:], ts[2:], outs[2:]), start=1):
            w = [1.0, float(k)] if order >= 1 else [1.0]
            x0_hat = w[0] * x0[1] + (w[1] * (x0[1] - x0[0]) if order >= 1 else 0)
            a, s = _x0_eps(cache, t)
            torch.testing.assert_close(out[:, :4], (x - a * x0_hat) / s, rtol=1e-4, atol=1e-4)
            v_hat = var[1] + (k * (var[1] - var[0]) if order >= 1 else 0)
            torch.testing.assert_close(out[:, 4:], v_hat, rtol=1e-5, atol=1e-5)
        assert cache.num_full == 2 and cache.num_forecast == 2


@pytest.mark.parametrize("features", ["final", "blocks"])
def test_order0_reuses_the_cached_features(features):
    m = _model()
    y = torch.tensor([2, 3])
    x1, x2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t1, t2 = torch.full((2,), 700), torch.full((2,), 650)
    cache = TaylorCache(m, 10, interval=100, order=0, first_steps=1, last_steps=0, features=features)
    with torch.no_grad():
        assert torch.equal(cache(x1, t1, y), m(x1, t1, y))
        out2 = cache(x2, t2, y)
        # the plain reuse, written with the official (unfused) blocks
        h, c = m.x_embedder(x1) + m.pos_embed, m.t_embedder(t1) + m.y_embedder(y, False)
        attn, mlp = [], []
        for b in m.blocks:
            sm, cm, gm, sf, cf, gf = b.adaLN_modulation(c).chunk(6, dim=1)
            a = b.attn(b.norm1(h) * (1 + cm.unsqueeze(1)) + sm.unsqueeze(1))
            h = h + gm.unsqueeze(1) * a
            f = b.mlp(b.norm2(h) * (1 + cf.unsqueeze(1)) + sf.unsqueeze(1))
            h = h + gf.unsqueeze(1) * f
            attn.append(a)
            mlp.append(f)
        h2, c2 = m.x_embedder(x2) + m.pos_embed, m.t_embedder(t2) + m.y_embedder(y, False)
        if features == "final":
            h2 = h
        else:
            for b, a, f in zip(m.blocks, attn, mlp):
                gm, gf = b.adaLN_modulation(c2).chunk(6, dim=1)[2::3]
                h2 = h2 + gm.unsqueeze(1) * a + gf.unsqueeze(1) * f
        expected = m.unpatchify(m.final_layer(h2, c2))
    torch.testing.assert_close(out2, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out2, m(x2, t2, y), atol=1e-3)      # not the full computation


@pytest.mark.parametrize("features", FEATURES)
def test_deterministic_no_leaks_and_batch_one(features):
    m = _model()
    s = make_sampler("ddpm", 12)
    cache = TaylorCache(m, 12, interval=3, order=2, features=features)
    za, zb, z1 = torch.randn(3, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ya, yb, y1 = torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5])
    a1 = _sample(cache.forward, s, za, ya)
    b_after_a = _sample(cache.forward, s, zb, yb)
    one = _sample(cache.forward, s, z1, y1)
    a2 = _sample(cache.forward, s, za, ya)
    assert torch.equal(a1, a2)                                                  # deterministic
    fresh = TaylorCache(m, 12, interval=3, order=2, features=features)
    assert torch.equal(b_after_a, _sample(fresh.forward, s, zb, yb))            # nothing carried over
    assert one.shape == (1, 4, 8, 8) and torch.isfinite(one).all()
    assert cache.num_full == 4 * len([f for f in cache.schedule() if f])
    # an interrupted run (same batch shape) does not leak into the next: the timestep goes up again
    with torch.no_grad():
        cache(za, torch.full((3,), 999), ya)
        cache(za, torch.full((3,), 900), ya)
    assert torch.equal(_sample(cache.forward, s, za, ya), a1)


@pytest.mark.parametrize("features", FEATURES)
def test_bf16(features):
    m = _model(dtype=torch.bfloat16)
    s = make_sampler("dpm-solver++", 8)
    z, y = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([1, 2])
    plain = _sample(m.forward, s, z, y)
    assert torch.equal(_sample(TaylorCache(m, 8, interval=1).forward, s, z, y), plain)
    out = _sample(TaylorCache(m, 8, interval=3, order=1, features=features).forward, s, z, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_sample_loop_api():
    m = _model()
    cache = TaylorCache(m, 10, interval=3)
    out = sample_loop(cache.forward, (2, 4, 8, 8), make_sampler("ddim", 10), model_kwargs=dict(y=torch.tensor([0, 1])))
    assert out.shape == (2, 4, 8, 8) and cache.num_full == 5 and cache.num_forecast == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps must be an int >= 1"),
    (dict(num_steps=10, interval=0), "interval must be an int >= 1"),
    (dict(num_steps=10, order=-1), "order must be an int >= 0"),
    (dict(num_steps=10, order=16), "order must be < 16"),
    (dict(num_steps=10, first_steps=0), "first_steps must be an int >= 1"),
    (dict(num_steps=10, last_steps=-1), "last_steps must be an int >= 0"),
    (dict(num_steps=10, interval=2.0), "interval must be an int"),
    (dict(num_steps=10, features="attn"), "features must be one of"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaylorCache(_model(), **kwargs)


def test_float64_and_timestep_range():
    m = _model().double()
    out = _sample(TaylorCache(m, 6, interval=2).forward, make_sampler("ddim", 6),
                  torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([1]))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="t must hold timesteps of the 1000-step training schedule"):
        TaylorCache(_model(), 6)(torch.randn(1, 4, 8, 8), torch.tensor([1000]), torch.tensor([1]))


def test_blocks_needs_gated_blocks():
    with pytest.raises(ValueError, match="features='blocks' needs adaLN-Zero or adaLN"):
        TaylorCache(_model("in-context"), 10, features="blocks")
    for block in ("cross-attention", "in-context", "adaLN"):     # the other features work for every block
        m = _model(block)
        for f in ("output", "final") + (("blocks",) if block == "adaLN" else ()):
            out = _sample(TaylorCache(m, 6, interval=2, features=f).forward, make_sampler("ddim", 6),
                          torch.randn(1, 4, 8, 8), torch.tensor([1]))
            assert torch.isfinite(out).all()


# ---- the --cache flags of the sampling CLIs -------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dit_fast import save_checkpoint  # noqa: E402
from dit_fast.sample_ddp import main as ddp_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    m = _model(depth=3, in_channels=3)            # pixel space: no VAE
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(m, path)
    return path


def _cli(module, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=300)


BAD_FLAGS = [
    (["--cache", "bogus"], "argument --cache: invalid choice: 'bogus'"),
    (["--cache", "taylor", "--cache-interval", "0"], "--cache-interval must be >= 1, got 0"),
    (["--cache", "taylor", "--cache-order", "-1"], "--cache-order must be >= 0, got -1"),
    (["--cache", "taylor", "--compile"], "--cache taylor runs in the eager loop"),
    (["--cache", "taylor", "--step-cache", "0.2"], "--step-cache 0.2 means --cache step"),
    (["--cache-interval", "3"], "--cache-interval applies to --cache taylor, not --cache none"),
    (["--cache", "taylor", "--num-sampling-steps", "2"], "--cache taylor with --num-sampling-steps 2"),
    (["--cache", "step", "--cache-shallow-blocks", "3"], "--cache-shallow-blocks must be in [1, 2]"),
]


# every case through sample_ddp; the first three through sample too (one subprocess each)
@pytest.mark.parametrize("module,flags,match", [("dit_fast.sample_ddp", f, m) for f, m in BAD_FLAGS]
                         + [("dit_fast.sample", f, m) for f, m in BAD_FLAGS[:3]])
def test_cli_bad_cache_flags(ckpt, tmp_path, module, flags, match):
    out = ["--out", str(tmp_path / "x.png")] if module == "dit_fast.sample" else ["--sample-dir", str(tmp_path)]
    r = _cli(module, "--ckpt", str(ckpt), "--sampler", "ddim", *out, *flags)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0], r.stderr
    assert not list(tmp_path.glob("**/*.npz")) and not (tmp_path / "x.png").exists()   # nothing sampled


def test_unsupported_sampler_named():
    from argparse import Namespace

    from dit_fast.sampling.cache_cli import cache_settings
    args = Namespace(cache="taylor", step_cache=0.0, sampler="euler", compile=False, cuda_graph=False,
                     **{f"cache_{k}": None for k in ("interval", "order", "first_steps", "last_steps", "features")})
    with pytest.raises(ValueError, match="--cache taylor does not support --sampler euler"):
        cache_settings(args)


def _ddp(ckpt, sample_dir, *flags):
    args = ["--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--num-fid-samples", "5",
            "--per-proc-batch-size", "3", "--cfg-scale", "2.0", "--sampler", "sde-dpm-solver++",
            "--num-sampling-steps", "8", "--global-seed", "1", *flags]
    assert ddp_main(args) == 0
    (npz,) = [p for p in Path(sample_dir).glob("*.npz")]
    with np.load(npz) as f:
        return npz.name, f["arr_0"]


def test_sample_ddp_cache_flags(ckpt, tmp_path):
    name_plain, plain = _ddp(ckpt, tmp_path / "plain")
    name_none, none = _ddp(ckpt, tmp_path / "none", "--cache", "none")
    name_i1, i1 = _ddp(ckpt, tmp_path / "i1", "--cache", "taylor", "--cache-interval", "1")
    name_t, taylor = _ddp(ckpt, tmp_path / "t", "--cache", "taylor")
    assert name_plain == name_none and name_i1 == name_t and name_t.endswith("-cache-taylor.npz")
    assert name_t == name_plain.replace(".npz", "-cache-taylor.npz")
    assert np.array_equal(none, plain) and np.array_equal(i1, plain)   # interval 1: the uncached sampler
    assert taylor.shape == plain.shape and not np.array_equal(taylor, plain)


def test_quality_configs_and_comparisons():
    from dit_fast.sampling.cache_cli import TAYLOR_DEFAULTS
    from dit_fast.sampling.quality import base_spec, compare, goals, parse_config

    c = parse_config("sde-dpm-solver++:20:taylor")
    assert c["taylor"] == TAYLOR_DEFAULTS["sde-dpm-solver++"] and c["steps"] == 20
    c = parse_config("ddim:50:logSNR:taylor=i8,o3,blocks")
    assert c["skip_type"] == "logSNR"
    assert c["taylor"] == dict(TAYLOR_DEFAULTS["ddim"], interval=8, order=3, features="blocks")
    for bad in ("ddim", "euler:20", "ddim:50:taylor=x3", "ddim:50:cache=0.1:taylor"):
        with pytest.raises(ValueError, match="config"):
            parse_config(bad)
    assert base_spec("dpm-solver++:20:logSNR:taylor=i5") == "dpm-solver++:20:logSNR"
    rows = [dict(config="ddpm:250", model_evals=250, seconds=100.0, frechet_distance=20.0, accuracy=0.9),
            dict(config="ddim:50", model_evals=50, seconds=20.0, frechet_distance=22.0, accuracy=0.9),
            dict(config="ddim:50:taylor", model_evals=12, seconds=5.0, frechet_distance=19.0, accuracy=0.895)]
    compare(rows)
    v = rows[2]["vs_uncached"]
    assert v["evals"] == 50 / 12 and v["speedup"] == 4.0 and v["fd_ratio"] == 19 / 22
    assert rows[2]["vs_ddpm250"]["speedup"] == 20.0 and "vs_uncached" not in rows[1]
    g = goals(rows)
    assert g["ddim:50:taylor"]["held"] == dict(evals=True, speedup=True, fd=True, accuracy=True)
    assert g["fastest_at_ddpm250_fd"] == dict(config="ddim:50:taylor", speedup=20.0, held=True)
