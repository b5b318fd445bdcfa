"""The drop-in DiT model against the official release (golden_A) and the paper's four blocks."""
import pickle

import pytest
import torch
import torch.nn.functional as F

import dit_fast
from dit_fast import BLOCK_TYPES, DiT, DiT_models
from dit_fast.models import DiT_configs
from dit_fast.models.dit import AdaLNBlock, BlockOutput, DiTBlock, modulate

# The golden comparisons run on the pure-PyTorch reference and on the default (fused) path.
BACKENDS = ["reference", "auto"]

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _golden_model(record):
    model = DiT(**record["config"])
    model.load_state_dict(record["state_dict"], strict=True)
    return model.eval()


def _perturbed(model, seed=0):
    """Give the zero-initialized adaLN / output layers random weights so outputs are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs(n=3, cfg=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------- official keys and outputs

def test_names():
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))
    assert sorted(DiT_configs) == sorted(DiT_models)


# (depth, hidden_size, num_heads) of the official models.py factories
OFFICIAL_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def test_factories_come_from_the_config_table():
    from dit_fast.models import dit
    for name, factory in DiT_models.items():
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = OFFICIAL_SIZES[size]
        assert DiT_configs[name] == dict(depth=depth, hidden_size=hidden, patch_size=int(patch), num_heads=heads)
        assert factory.__name__ == f"DiT_{size}_{patch}" and getattr(dit, factory.__name__) is factory
        with torch.device("meta"):
            model = factory(input_size=8, num_classes=10)
        assert {k: model.config[k] for k in DiT_configs[name]} == DiT_configs[name]
        assert model.config["num_classes"] == 10
    assert pickle.loads(pickle.dumps(dit.DiT_XL_2)) is dit.DiT_XL_2


@pytest.mark.slow
def test_state_dict_keys_match_every_official_configuration(golden):
    for key, shapes in golden["manifest"].items():
        name, image_size = key.split("@")
        with torch.device("meta"):
            model = DiT_models[name](input_size=int(image_size) // 8)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == {k: tuple(v) for k, v in shapes.items()}, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_official(golden, backend):
    for record in golden["models"]:
        model = _golden_model(record)
        with torch.no_grad(), dit_fast.use_backend(backend):
            out = model(record["x"], record["t"], record["y"])
        torch.testing.assert_close(out, record["forward"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_cfg_matches_official(golden, backend):
    for record in golden["models"]:
        model = _golden_model(record)
        with torch.no_grad(), dit_fast.use_backend(backend):
            out = model.forward_with_cfg(record["cfg_x"], record["cfg_t"], record["cfg_y"], record["cfg_scale"])
        torch.testing.assert_close(out, record["forward_with_cfg"], atol=1e-5, rtol=0)


def test_guide_all_channels(golden):
    record = golden["models"][0]
    model = _golden_model(record)
    x, t, y, s = record["cfg_x"], record["cfg_t"], record["cfg_y"], record["cfg_scale"]
    with torch.no_grad():
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, y)
        guided = model.forward_with_cfg(x, t, y, s, guide_channels="all")
    C = model.in_channels
    cond, uncond = out[:, :C].chunk(2)
    expected = uncond + s * (cond - uncond)
    torch.testing.assert_close(guided[:, :C], torch.cat([expected, expected]), atol=1e-5, rtol=0)
    torch.testing.assert_close(guided[:, C:], out[:, C:])
    # the official default leaves channel 3 unguided
    official = model.forward_with_cfg(x, t, y, s)
    assert not torch.allclose(official[:, 3], guided[:, 3])


def test_official_initialization():
    model = DiT(**TINY)
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
        assert block.adaLN_modulation[-1].bias.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    assert model.final_layer.adaLN_modulation[-1].weight.abs().sum() == 0
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()
    # zero-initialized output layer: the untrained model outputs zeros
    x, t, y = _inputs()
    assert model(x, t, y).abs().max() == 0
    # pos_embed: the frozen 2-D sin-cos table (first half of the channels encodes the column)
    from dit_fast.models import get_2d_sincos_pos_embed
    grid = TINY["input_size"] // TINY["patch_size"]
    ref = torch.from_numpy(get_2d_sincos_pos_embed(TINY["hidden_size"], grid)).float()
    torch.testing.assert_close(model.pos_embed[0], ref)
    half = TINY["hidden_size"] // 2
    torch.testing.assert_close(ref[grid, :half], ref[0, :half])  # same column
    torch.testing.assert_close(ref[1, half:], ref[0, half:])     # same row


def test_label_dropout_in_training():
    torch.manual_seed(0)
    model = DiT(**TINY, class_dropout_prob=0.5)
    y = torch.zeros(2000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(y)
    assert 0.4 < (dropped == TINY["num_classes"]).float().mean() < 0.6
    forced = model.y_embedder.token_drop(y[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, 0, 10, 0]


# ---------------------------------------------------------------- dtypes

def test_bfloat16_model_runs():
    model = _perturbed(DiT(**TINY)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_autocast_bfloat16():
    model = _perturbed(DiT(**TINY)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- the four blocks

def _param_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_blocks_forward_backward(block):
    torch.manual_seed(0)
    model = _perturbed(DiT(**TINY, block=block))
    for p in model.parameters():  # non-trivial output layer for every block type
        if p.requires_grad and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the output depends on the label and the timestep
    with torch.no_grad():
        other = model(x, t, (y + 1) % TINY["num_classes"])
        later = model(x, (t + 100) % 1000, y)
    assert not torch.allclose(out, other) and not torch.allclose(out, later)


def test_block_extra_parameters():
    D, depth = TINY["hidden_size"], TINY["depth"]
    base = _param_count(DiT(**TINY, block="in-context"))
    counts = {b: _param_count(DiT(**TINY, block=b)) for b in BLOCK_TYPES}
    # in-context: standard ViT blocks (LayerNorm affines, 4·D per block) + a final LayerNorm affine.
    plain = base - depth * 4 * D - 2 * D
    assert counts["cross-attention"] - plain == depth * (6 * D + 4 * D * D + 4 * D) + 2 * D
    assert counts["adaLN"] - plain == depth * (4 * D * D + 4 * D) + (2 * D * D + 2 * D)
    assert counts["adaLN-Zero"] - plain == depth * (6 * D * D + 6 * D) + (2 * D * D + 2 * D)


def test_in_context_removes_condition_tokens():
    model = _perturbed(DiT(**TINY, block="in-context"))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.x.shape))
    x, t, y = _inputs()
    out = model(x, t, y)
    assert seen[0][1] == (TINY["input_size"] // TINY["patch_size"]) ** 2 + 2
    assert out.shape == (3, 8, 8, 8)


def test_adaln_zero_is_identity_at_init():
    # adaLN-Zero blocks start as the identity function (gates are zero); plain adaLN does not.
    torch.manual_seed(0)
    x = torch.randn(2, 16, TINY["hidden_size"])
    c = torch.randn(2, TINY["hidden_size"])
    zero = DiT(**TINY, block="adaLN-Zero").blocks[0]
    plain = DiT(**TINY, block="adaLN").blocks[0]
    torch.testing.assert_close(zero(x, c).x, x)
    assert not torch.allclose(plain(x, c).x, x)


# ---------------------------------------------------------------- the fused pieces (public API)

@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_fused_pieces_compose_to_forward(block):
    model = _perturbed(DiT(**dict(TINY, depth=3), block=block)).eval()
    x, t, y = _inputs()
    D, T = TINY["hidden_size"], (TINY["input_size"] // TINY["patch_size"]) ** 2
    with torch.no_grad():
        t = model.check_inputs(x, t, y)
        tokens, c, T_out = model.embed(x, t, y)
        mods = model.block_modulations(c)
        a, h_mid = model.run_blocks(tokens, c, mods, 0, 1)
        b, h = model.run_blocks(a, c, mods, 1, 3)
        out = model.head(b, c, T_out, mods, h)
        full = model(x, t, y)
    assert T_out == T and tokens.shape == (3, T + 2 if block == "in-context" else T, D)
    assert c is None if block == "in-context" else c.shape == ((3, 2, D) if block == "cross-attention" else (3, D))
    adaln = block in ("adaLN-Zero", "adaLN")
    assert (mods is not None) == adaln
    if adaln:
        k = 6 if block == "adaLN-Zero" else 4
        assert [m.shape for m in mods] == [(3, k * D)] * 3 + [(3, 2 * D)]
    assert h_mid is None and (h is not None) == adaln   # a range fuses the final norm only at the end
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_every_block_returns_block_output(block):
    model = _perturbed(DiT(**TINY, block=block)).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        tokens, c, _ = model.embed(x, model.check_inputs(x, t, y), y)
        out = model.blocks[0](tokens, c)
        assert isinstance(out, BlockOutput) and out.h is None and out.x.shape == tokens.shape
        mods = model.block_modulations(c)
        if mods is None:
            return
        # asked to fuse the next LayerNorm-modulate, the block returns it as h
        D = tokens.shape[-1]
        shift, scale = mods[1][:, :2 * D].chunk(2, dim=1)
        fused = model.blocks[0](tokens, c, mod=mods[0], next_norm=(shift, scale, 1e-6))
    assert isinstance(fused, BlockOutput)
    torch.testing.assert_close(fused.x, out.x, rtol=1e-5, atol=1e-5)
    expected = modulate(F.layer_norm(fused.x, (D,), eps=1e-6), shift, scale)
    torch.testing.assert_close(fused.h, expected, rtol=1e-5, atol=1e-5)


def test_adaln_block_is_the_dit_block_without_gates():
    zero, plain = DiTBlock(64, 4), AdaLNBlock(64, 4)
    assert isinstance(plain, DiTBlock) and zero.gated and not plain.gated
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: (v.shape if "adaLN" not in k else (4 * 64,) + tuple(v.shape[1:]))
        for k, v in zero.state_dict().items()}


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny():
    return DiT(**TINY).eval()


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 8, 8), "in_channels=4"),
    ((2, 4, 16, 16), "input_size"),
    ((2, 4, 8, 6), "input_size"),
    ((4, 8, 8), "4-D"),
])
def test_bad_x(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(shape), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("labels", [[0, 11], [-1, 0]])
def test_labels_out_of_range(tiny, labels):
    x, t, _ = _inputs(2)
    with pytest.raises(ValueError, match="y must hold labels in"):
        tiny(x, t, torch.tensor(labels))


def test_null_class_allowed():
    # label num_classes is classifier-free guidance's null class: the last row of the embedding table
    model = _perturbed(DiT(**TINY)).eval()
    x, t, _ = _inputs(2)
    null = TINY["num_classes"]
    y = torch.tensor([null, 3])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == (2, 2 * TINY["in_channels"], 8, 8) and torch.isfinite(out).all()
        assert not torch.allclose(out[0], model(x, t, torch.tensor([0, 3]))[0])
        model.y_embedder.embedding_table.weight[null].add_(1.0)     # changes only the null-labelled sample
        moved = model(x, t, y)
    assert not torch.allclose(moved[0], out[0]) and torch.equal(moved[1], out[1])


def test_bad_y(tiny):
    x, t, _ = _inputs(2)
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \(2,\)"):
        tiny(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer class labels"):
        tiny(x, t, torch.tensor([1.0, 2.0]))


def test_bad_t(tiny):
    x, _, y = _inputs(2)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        tiny(x, torch.zeros(3), y)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        tiny(x, torch.zeros(2, 1), y)
    # a scalar timestep is broadcast over the batch
    torch.testing.assert_close(tiny(x, torch.tensor(5), y), tiny(x, torch.tensor([5, 5]), y))


def test_odd_batch_with_cfg(tiny):
    x, t, y = _inputs(3)
    with pytest.raises(ValueError, match="even batch"):
        tiny.forward_with_cfg(x, t, y, 4.0)
    with pytest.raises(ValueError, match="guide_channels"):
        tiny.forward_with_cfg(x[:2], t[:2], y[:2], 4.0, guide_channels=7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden_size=66, num_heads=4), r"hidden_size \(66\) must be divisible by num_heads \(4\)"),
    (dict(input_size=9), r"input_size \(9\) must be divisible by patch_size \(2\)"),
    (dict(block="adaLN-One"), "block must be one of"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{**TINY, **kwargs})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_small_integer_labels_refused(tiny, dtype):
    # F.embedding takes int64/int32 only: refused by the label check, not inside the lookup
    x, t, _ = _inputs(2)
    with pytest.raises(ValueError, match=rf"torch.int64 or torch.int32, got {dtype} \(use y.long\(\)\)"):
        tiny(x, t, torch.tensor([1, 2], dtype=dtype))


def test_int32_labels(tiny):
    x, t, _ = _inputs(2)
    y = torch.tensor([1, 2])
    torch.testing.assert_close(tiny(x, t, y.int()), tiny(x, t, y))


def test_cfg_empty_batch(tiny):
    x, t, y = _inputs(2)
    out = tiny.forward_with_cfg(x[:0], t[:0], y[:0], 4.0)
    assert out.shape == (0, 8, 8, 8)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_cfg_scale_non_finite(tiny, scale):
    x, t, y = _inputs(2)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        tiny.forward_with_cfg(x, t, y, scale)


@pytest.mark.parametrize("x_dtype, model_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float32),
                                                  (torch.float32, torch.bfloat16)])
def test_input_dtype_mismatch_names_both(x_dtype, model_dtype):
    model = DiT(**TINY).eval().to(model_dtype)
    x, t, y = _inputs(2)
    with pytest.raises(ValueError, match=rf"x has dtype {x_dtype} but the model's parameters are {model_dtype}"):
        model(x.to(x_dtype), t, y)
    with pytest.raises(ValueError, match="floating-point"):
        model(x.to(torch.int64), t, y)


@pytest.mark.parametrize("x_dtype, model_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_input_dtype_mismatch_under_autocast(x_dtype, model_dtype):
    # as the official model (whose conv autocasts any input): under autocast every input dtype runs,
    # and gives the output of a matching input (x is bf16-representable, so the casts are exact)
    model = _perturbed(DiT(**TINY)).eval().to(model_dtype)
    x, t, y = _inputs(2)
    x = x.bfloat16().float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.to(x_dtype), t, y)
        ref = model(x.to(model_dtype), t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
