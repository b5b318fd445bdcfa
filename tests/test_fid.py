"""FID: the Fréchet distance, batched statistics, the FID Inception-v3 and the CLI (dit_fast.eval.fid)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from dit_fast.eval.fid import (FeatureStatistics, FIDInceptionV3, feature_statistics, frechet_distance,
                               load_inception, main, precision_recall)


def _random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ----------------------------------------------------------------------------- the distance

def test_closed_form_one_dimension_and_diagonal():
    # N(m1, v1) vs N(m2, v2) in 1-D: (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    rng = np.random.default_rng(0)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_matches_sqrtm_formula_for_general_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    s1, s2 = _random_cov(40, rng), _random_cov(40, rng)
    m1, m2 = rng.standard_normal(40), rng.standard_normal(40)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(m1, s1, m2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(got, rel=1e-9)        # symmetric
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-9 * np.trace(s1)              # zero for equal Gaussians


def test_singular_covariances_from_few_samples():
    rng = np.random.default_rng(2)
    s1, s2 = _random_cov(64, rng, rank=5), _random_cov(64, rng, rank=7)             # N < D, as with few images
    d = frechet_distance(np.zeros(64), s1, np.zeros(64), s2)
    assert np.isfinite(d) and d > 0
    # commuting case with zero eigenvalues: exact
    assert frechet_distance([0, 0], np.diag([1.0, 0.0]), [0, 0], np.diag([0.0, 4.0])) == pytest.approx(5.0)


def test_distance_errors():
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="3x3"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- statistics in batches

@pytest.mark.parametrize("batch_size", [1, 7, 50, 1000])
def test_batched_statistics_equal_numpy(batch_size):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((123, 10)) * 5 + 100                  # a large mean: cancellation-prone
    images = np.zeros((123, 2, 2, 3), np.uint8)
    idx = iter(range(0, 123, batch_size))

    def fn(batch):
        i = next(idx)
        return torch.from_numpy(feats[i:i + len(batch)])

    mu, sigma = feature_statistics(images, fn, batch_size=batch_size)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-11)


def test_feature_statistics_errors():
    st = FeatureStatistics()
    with pytest.raises(ValueError, match="no features"):
        st.mu
    st.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        st.sigma
    with pytest.raises(ValueError, match="dimension 3"):
        st.update(np.ones((2, 4)))


def test_precision_recall():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((60, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    p, r = precision_recall(real, real[:30] * 0.1)                     # collapsed fakes: precise, low recall
    assert p == 1.0 and r < 0.5


# ----------------------------------------------------------------------------- Inception-v3 and the CLI

def _kaiming(model, seed=0):
    """Random weights that keep activations O(1) through the 90-odd layers (the default init vanishes)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.data = torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.bias.data.normal_(0, 0.1, generator=g)
    return model


def test_architecture_is_the_fid_inception():
    m = FIDInceptionV3()
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == 23_850_960            # torchvision Inception3, 1008 classes, no aux
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert sd["Conv2d_1a_3x3.bn.running_var"].shape == (32,)
    assert sd["fc.weight"].shape == (1008, 2048)
    # the FID blocks: average pools ignore the padding, the last block max-pools
    x = torch.zeros(1, 2048, 3, 3)
    x[0, :, 0, 0] = 9.0
    blk = m.Mixed_7c.eval()
    pooled = {}
    blk.branch_pool.register_forward_hook(lambda mod, inp, out: pooled.setdefault("in", inp[0]))
    with torch.no_grad():
        blk(x)
    assert pooled["in"][0, 0, 1, 1] == 9.0                                   # max, not mean
    pooled.clear()
    blk6 = m.Mixed_6e.eval()
    blk6.branch_pool.register_forward_hook(lambda mod, inp, out: pooled.setdefault("in", inp[0]))
    with torch.no_grad():
        blk6(torch.ones(1, 768, 3, 3))
    assert torch.allclose(pooled["in"], torch.ones(1, 768, 3, 3))           # count_include_pad=False


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialized FID Inception saved like a torchvision-layout file: extra AuxLogits.*
    entries and no BatchNorm num_batches_tracked counters (both must be accepted)."""
    sd = _kaiming(FIDInceptionV3()).state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    path = tmp_path_factory.mktemp("w") / "pt_inception-random.pth"
    torch.save(sd, path)
    return path


@pytest.mark.slow
def test_cli_fid_with_local_weights(weights, tmp_path, capsys, monkeypatch):
    from dit_fast.eval import fid as fid_module

    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b, labels=np.arange(2))
    # record the features the CLI computes (the network is slow on the CPU: run it once per image)
    seen = []
    real_features = fid_module.inception_features

    def recording(model, device="cpu"):
        fn = real_features(model, device)

        def wrapped(batch):
            out = fn(batch)
            seen.append((batch.copy(), out.numpy().copy()))
            return out
        return wrapped
    monkeypatch.setattr(fid_module, "inception_features", recording)
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--weights", str(weights),
                 "--batch-size", "1", "--device", "cpu"]) == 0
    printed = float(capsys.readouterr().out.split("FID:")[1].split()[0])
    assert len(seen) == 4 and all(f.shape == (1, 2048) for _, f in seen)       # batches of --batch-size
    assert np.array_equal(np.concatenate([x for x, _ in seen[:2]]), a)
    fa = np.concatenate([f for _, f in seen[:2]])
    fb = np.concatenate([f for _, f in seen[2:]])
    assert fa.std() > 1e-3 and not np.allclose(fa, fb)                       # activations did not vanish
    expected = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert expected > 0 and printed == pytest.approx(expected, rel=1e-6, abs=2e-6)
    # the features are the loaded network's pool3 output
    net = load_inception(weights)
    with torch.no_grad():
        direct = net(torch.from_numpy(a[:1]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(direct.numpy(), fa[:1], rtol=1e-4, atol=1e-5)
    # stored statistics (an ADM / pytorch-fid reference batch) are used as they are
    np.savez(tmp_path / "ra.npz", mu=fa.mean(0), sigma=np.cov(fa, rowvar=False))
    np.savez(tmp_path / "rb.npz", mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    assert main([str(tmp_path / "ra.npz"), str(tmp_path / "rb.npz"), "--weights", str(weights)]) == 0
    assert float(capsys.readouterr().out.split("FID:")[1].split()[0]) == pytest.approx(expected, abs=2e-6)


def test_cli_errors(weights, tmp_path, capsys):
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    a = str(tmp_path / "a.npz")
    cases = [
        ([a, a, "--weights", str(tmp_path / "none.pth")], "--weights: no Inception weights at"),
        ([a, a, "--weights", str(tmp_path / "bad.pth")], "--weights: "),
        ([a, str(tmp_path / "missing.npz"), "--weights", str(weights)], "second .npz: no such file"),
        ([str(tmp_path / "f.npz"), a, "--weights", str(weights)], "arr_0 must be uint8"),
        ([a, a, "--batch-size", "0"], "--batch-size must be positive"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dit_fast.eval.fid: error: ") and needle in err[0], err
