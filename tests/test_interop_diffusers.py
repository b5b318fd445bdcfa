"""dit_fast <-> diffusers DiTTransformer2DModel conversion.

Tolerance. With the timestep-frequency difference removed (match_official_timestep_embedding), the
only algorithmic difference left is that diffusers computes q, k, v with three GEMMs where the
official model runs one fused qkv GEMM: the same dot products (same operands, same length D), which
a BLAS may sum in a different order. A float32 dot product of length K changes by at most ~K * eps *
sum|a_i b_i| under reordering (typically ~sqrt(K) * eps relative, eps = 6e-8); with K <= 4 * 64 here
and two blocks this is ~1e-6 relative at worst. We bound the max abs difference by
TOL = 1e-5 * max(1, max|out|). Measured on CPU (torch 2.13, diffusers 0.42.1): 0.0 (bit-identical).
The stock diffusers model (downscale_freq_shift=1) differs by 0.125 (t = 250) and 0.306 (t = 999) on
the random model and 6.5e-3 on the official golden model, 2-4 orders of magnitude above TOL, so the
bound separates the two cases.
"""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed")
from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_timestep_embedding  # noqa: E402

from dit_fast.interop.diffusers import (  # noqa: E402
    from_diffusers, from_diffusers_model, match_official_timestep_embedding, to_diffusers, to_diffusers_model)
from dit_fast.models import DiT  # noqa: E402
from dit_fast.models.dit import TimestepEmbedder  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _tol(ref):
    return 1e-5 * max(1.0, ref.abs().max().item())


def _random_dit(seed=0, **overrides):
    """A small DiT whose zero-initialized layers (adaLN, final layer) are perturbed: output O(1)."""
    torch.manual_seed(seed)
    model = DiT(**dict(TINY, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.3 if name.endswith("weight") else 0.1)
    return model


def _inputs(model, t, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = model.config["input_size"]
    x = torch.randn(batch, model.config["in_channels"], s, s, generator=g)
    y = torch.tensor([1, 5, model.config["num_classes"]])[:batch]     # includes the null class
    return x, torch.full((batch,), t, dtype=torch.long), y


def _assert_state_dicts_equal(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_round_trip_exact():
    model = _random_dit()
    sd = model.state_dict()
    sd_hf, cfg_hf = to_diffusers(sd, model.config)
    sd2, cfg2 = from_diffusers(sd_hf, cfg_hf)
    _assert_state_dicts_equal(sd2, sd)
    assert cfg2 == model.config
    # and the other way: to_diffusers(from_diffusers(.)) is the identity on the diffusers side
    sd_hf2, cfg_hf2 = to_diffusers(sd2, cfg2)
    _assert_state_dicts_equal(sd_hf2, sd_hf)
    assert cfg_hf2 == cfg_hf


@pytest.mark.parametrize("overrides", [dict(learn_sigma=False), dict(class_dropout_prob=0.0)])
def test_round_trip_variants(overrides):
    model = _random_dit(**overrides)
    sd_hf, cfg_hf = to_diffusers(model.state_dict(), model.config)
    sd2, cfg2 = from_diffusers(sd_hf, cfg_hf, class_dropout_prob=model.config["class_dropout_prob"])
    _assert_state_dicts_equal(sd2, model.state_dict())
    assert cfg2 == model.config
    hf = DiTTransformer2DModel(**cfg_hf)
    hf.load_state_dict(sd_hf, strict=True)


def test_config_inferred_when_missing():
    # num_heads is inferred from the named configuration with the same hidden size (DiT-S: 6).
    model = _random_dit(hidden_size=384, num_heads=6, depth=1)
    sd_hf, cfg_hf = to_diffusers(model.state_dict())
    assert cfg_hf == to_diffusers(model.state_dict(), model.config)[1]


def test_keys_and_shapes_match_diffusers_for_dit_xl2(golden):
    """The full DiT-XL/2 layouts (256 and 512) map onto diffusers' own parameter names and shapes
    (checked on the meta device: no memory, no weights)."""
    from dit_fast.interop.diffusers import _canonical_pos_embed

    for key, image_size in (("DiT-XL/2@256", 256), ("DiT-XL/2@512", 512)):
        shapes = golden["manifest"][key]
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        sd["pos_embed"] = _canonical_pos_embed(1152, image_size // 16)
        config = dict(input_size=image_size // 8, patch_size=2, hidden_size=1152, depth=28, num_heads=16)
        sd_hf, cfg_hf = to_diffusers(sd, config)
        with torch.device("meta"):
            ref = DiTTransformer2DModel(**cfg_hf).state_dict()
        assert {k: tuple(v.shape) for k, v in sd_hf.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_outputs_match_with_official_timestep_embedding():
    model = _random_dit()
    hf = to_diffusers_model(model, official_timestep_embedding=True)
    assert isinstance(hf, DiTTransformer2DModel) and not hf.training
    for t in (0, 1, 250, 999):
        x, tt, y = _inputs(model, t)
        with torch.no_grad():
            ref = model(x, tt, y)
            out = hf(x, timestep=tt, class_labels=y).sample
        assert ref.std() > 0.5                     # the output is not trivially zero
        assert (out - ref).abs().max().item() <= _tol(ref), t


def test_outputs_match_official_golden(golden):
    """Against tensors computed by the official code itself (tests/data/golden_A.pt)."""
    rec = golden["models"][0]
    sd_hf, cfg_hf = to_diffusers(rec["state_dict"], rec["config"])
    hf = DiTTransformer2DModel(**cfg_hf)
    hf.load_state_dict(sd_hf, strict=True)
    hf.eval()
    with torch.no_grad():
        stock = hf(rec["x"], timestep=rec["t"], class_labels=rec["y"]).sample
        match_official_timestep_embedding(hf)
        fixed = hf(rec["x"], timestep=rec["t"], class_labels=rec["y"]).sample
    ref = rec["forward"]
    assert (fixed - ref).abs().max().item() <= _tol(ref)
    assert (stock - ref).abs().max().item() > 100 * _tol(ref)   # documented difference 1


def test_stock_diffusers_differs_only_by_timestep_frequencies(monkeypatch):
    model = _random_dit()
    hf = to_diffusers_model(model)            # stock: downscale_freq_shift=1
    # t = 0: every frequency gives cos(0)=1, sin(0)=0, so the embeddings agree.
    x, t0, y = _inputs(model, 0)
    with torch.no_grad():
        ref0 = model(x, t0, y)
        assert (hf(x, timestep=t0, class_labels=y).sample - ref0).abs().max().item() <= _tol(ref0)
    diffs = {}
    for t in (1, 250, 999):
        x, tt, y = _inputs(model, t)
        with torch.no_grad():
            diffs[t] = (hf(x, timestep=tt, class_labels=y).sample - model(x, tt, y)).abs().max().item()
    assert diffs[250] > 100 * _tol(ref0) and diffs[999] > 100 * _tol(ref0), diffs
    # Giving dit_fast diffusers' frequencies (i / 127 instead of i / 128) closes the gap to rounding.
    monkeypatch.setattr(TimestepEmbedder, "timestep_embedding",
                        staticmethod(lambda t, dim, max_period=10000: get_timestep_embedding(t, dim, True, 1)))
    for t in (1, 250, 999):
        x, tt, y = _inputs(model, t)
        with torch.no_grad():
            ref = model(x, tt, y)
            assert (hf(x, timestep=tt, class_labels=y).sample - ref).abs().max().item() <= _tol(ref)


def test_timestep_embedding_difference():
    t = torch.arange(1000)
    official = TimestepEmbedder.timestep_embedding(t, 256)
    assert torch.equal(official, get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0))
    diff = (official - get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)).abs()
    assert diff[0].max() == 0 and diff.max() > 1.9     # up to ~2: cos/sin fully out of phase


def test_norm_eps_difference():
    """diffusers' default norm_eps=1e-5 (hub configs) on the pre-MLP LayerNorm vs the official 1e-6."""
    model = _random_dit()
    sd_hf, cfg_hf = to_diffusers(model.state_dict(), model.config)
    assert cfg_hf["norm_eps"] == 1e-6
    hf = match_official_timestep_embedding(DiTTransformer2DModel(**dict(cfg_hf, norm_eps=1e-5)))
    hf.load_state_dict(sd_hf, strict=True)
    hf.eval()
    x, t, y = _inputs(model, 500)
    with torch.no_grad():
        ref = model(x, t, y)
        d = (hf(x, timestep=t, class_labels=y).sample - ref).abs().max().item()
    assert 0 < d < 1e-3, d


def test_pos_embed_identical():
    model = _random_dit(input_size=16)
    hf = to_diffusers_model(model)
    assert torch.equal(hf.pos_embed.pos_embed, model.pos_embed)


def test_model_helpers_round_trip():
    model = _random_dit()
    back = from_diffusers_model(to_diffusers_model(model))
    assert isinstance(back, DiT) and not back.training
    _assert_state_dicts_equal(back.state_dict(), model.state_dict())
    assert back.config == model.config


def test_bfloat16_round_trip():
    model = _random_dit().to(torch.bfloat16)
    sd_hf, cfg_hf = to_diffusers(model.state_dict(), model.config)
    _assert_state_dicts_equal(from_diffusers(sd_hf, cfg_hf)[0], model.state_dict())
    hf = to_diffusers_model(model)
    assert next(hf.parameters()).dtype == torch.bfloat16
    back = from_diffusers_model(hf)
    _assert_state_dicts_equal(back.state_dict(), model.state_dict())


def test_native_diffusers_model():
    """A diffusers-initialized model has independent embedder copies per block: refused; once they
    are tied, it converts and the outputs match."""
    torch.manual_seed(0)
    hf = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                               norm_eps=1e-6).eval()
    with pytest.raises(ValueError, match="differs from block 0"):
        from_diffusers_model(hf)
    with torch.no_grad():
        hf.transformer_blocks[1].norm1.emb.load_state_dict(hf.transformer_blocks[0].norm1.emb.state_dict())
        for name, p in hf.named_parameters():   # diffusers zero-inits nothing here, but make sure
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0, 0.2)
    model = from_diffusers_model(hf)
    match_official_timestep_embedding(hf)
    x, t, y = _inputs(model, 321)
    with torch.no_grad():
        ref = model(x, t, y)
        assert (hf(x, timestep=t, class_labels=y).sample - ref).abs().max().item() <= _tol(ref)


def test_refuses_other_blocks_and_configs():
    for block in ("adaLN", "cross-attention", "in-context"):
        model = DiT(**TINY, block=block)
        with pytest.raises(ValueError, match="block"):
            to_diffusers(model.state_dict(), model.config)
        with pytest.raises(ValueError, match="block"):
            to_diffusers_model(model)
    model = DiT(**TINY, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        to_diffusers(model.state_dict(), model.config)
    model = _random_dit()
    sd_hf, cfg_hf = to_diffusers(model.state_dict(), model.config)
    with pytest.raises(ValueError, match="activation_fn"):
        from_diffusers(sd_hf, dict(cfg_hf, activation_fn="gelu"))
    with pytest.raises(ValueError, match="missing key"):
        from_diffusers({k: v for k, v in sd_hf.items() if "proj_out_2" not in k}, cfg_hf)
    bad = dict(model.state_dict())
    bad["pos_embed"] = bad["pos_embed"] + 0.1
    with pytest.raises(ValueError, match="pos_embed"):
        to_diffusers(bad, model.config)
    with pytest.raises(ValueError, match="unexpected"):
        to_diffusers(dict(model.state_dict(), extra=torch.zeros(1)), model.config)
