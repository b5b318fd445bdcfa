"""Step caching (dit_fast.sampling.StepCache)."""
import pytest
import torch

from dit_fast import DiT
from dit_fast.sampling import LoopRunner, StepCache, make_sampler, sample_loop


def _model(block="adaLN-Zero", depth=4, seed=0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
            num_classes=6, block=block).eval()
    with torch.no_grad():          # leave the zero-initialized adaLN-Zero state: blocks must matter
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("block", ["adaLN-Zero", "adaLN", "cross-attention", "in-context"])
def test_threshold_zero_is_the_plain_model(block):
    m = _model(block)
    cache = StepCache(m, threshold=0.0)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 2, 5])
    with torch.no_grad():
        for t in (900, 500, 100):
            tt = torch.full((3,), t)
            torch.testing.assert_close(cache(x, tt, y), m(x, tt, y), rtol=1e-6, atol=1e-6)
    assert cache.num_calls == 3 and cache.num_reused == 0


@pytest.mark.slow
def test_full_sampling_run_unchanged_at_threshold_zero_and_with_cfg():
    m = _model()
    cache = StepCache(m, threshold=0.0)
    z = torch.randn(2, 4, 8, 8)
    kw = dict(y=torch.tensor([1, 2, 6, 6]), cfg_scale=3.0)
    sampler = make_sampler("ddim", 8)
    plain = sample_loop(m.forward_with_cfg, (4, 4, 8, 8), sampler, noise=torch.cat([z, z]), model_kwargs=kw)
    cached = sample_loop(cache.forward_with_cfg, (4, 4, 8, 8), sampler, noise=torch.cat([z, z]), model_kwargs=kw)
    # StepCache runs DiT.forward's pieces, but its shallow/deep split ends the probe on a plain
    # residual where DiT.forward fuses it with the next block's LayerNorm: the same math, float32
    # rounding amplified over 8 steps.
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)


def test_reused_step_is_shallow_blocks_plus_cached_residual():
    m = _model(depth=4)
    cache = StepCache(m, threshold=1e9, shallow_blocks=1)
    x1, x2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 3])
    t1, t2 = torch.full((2,), 800), torch.full((2,), 700)

    def embed(x, t):
        h = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, False)
        return h, c

    with torch.no_grad():
        out1 = cache(x1, t1, y)                   # first call of a run: computes everything
        out2 = cache(x2, t2, y)                   # reused
        h, c = embed(x1, t1)
        h1 = m.blocks[0](h, c).x
        deep = h1
        for b in m.blocks[1:]:
            deep = b(deep, c).x
        residual = deep - h1
        h, c = embed(x2, t2)
        expected = m.unpatchify(m.final_layer(m.blocks[0](h, c).x + residual, c))
    torch.testing.assert_close(out1, m(x1, t1, y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out2, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2, m(x2, t2, y), atol=1e-4)      # and it is not the full computation
    assert cache.num_calls == 2 and cache.num_reused == 1 and cache.reuse_fraction == 0.5
    assert cache.deep_fraction == 0.75


@pytest.mark.slow
def test_accumulator_threshold_max_reuse_and_reset():
    m = _model()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        # max_reuse=2: full, reuse, reuse, full, reuse, reuse
        cache = StepCache(m, threshold=1e9, max_reuse=2)
        for t in range(900, 300, -100):
            cache(x + 0.01 * t / 100, torch.full((2,), t), y)
        assert cache.num_calls == 6 and cache.num_reused == 4
        # a rising timestep starts a new run: its first call computes
        cache.reset_stats()
        cache(x, torch.full((2,), 950), y)
        assert cache.num_reused == 0
        # a tiny threshold never reuses when the probe changes
        cache = StepCache(m, threshold=1e-9)
        for t in (900, 800, 700):
            cache(x * t / 900, torch.full((2,), t), y)
        assert cache.num_reused == 0
        # a batch-shape change invalidates the cache
        cache = StepCache(m, threshold=1e9)
        cache(x, torch.full((2,), 900), y)
        cache(torch.cat([x, x]), torch.full((4,), 800), torch.cat([y, y]))
        assert cache.num_reused == 0


@pytest.mark.slow
def test_caching_saves_model_work_in_a_sampling_run():
    m = _model()
    calls = {"n": 0}
    deep_block = m.blocks[2]
    orig = deep_block.forward

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)
    deep_block.forward = counting
    cache = StepCache(m, threshold=0.5)
    z = torch.randn(2, 4, 8, 8)
    out = sample_loop(cache, z.shape, make_sampler("ddpm", 20), noise=z, model_kwargs=dict(y=torch.tensor([0, 1])))
    assert torch.isfinite(out).all()
    assert 0 < cache.num_reused < 20 and cache.num_calls == 20
    assert calls["n"] == 20 - cache.num_reused


def test_bad_arguments_and_modes():
    m = _model()
    with pytest.raises(ValueError, match="shallow_blocks"):
        StepCache(m, shallow_blocks=4)
    with pytest.raises(ValueError, match="shallow_blocks"):
        StepCache(m, shallow_blocks=0)
    with pytest.raises(ValueError, match="threshold"):
        StepCache(m, threshold=-1)
    with pytest.raises(ValueError, match="max_reuse"):
        StepCache(m, max_reuse=0)
    with pytest.raises(ValueError, match="DiT"):
        StepCache(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step caching"):
        LoopRunner(StepCache(m).forward_with_cfg, make_sampler("ddim", 4), mode="compile")
