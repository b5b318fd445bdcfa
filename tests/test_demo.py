"""The digits demo (tiny settings: the full demo's quality is measured by running it, not here), the
digits classifier, and the Fréchet distance."""
import json

import numpy as np
import pytest
import torch

from dit_fast.data import load_digits_images
from dit_fast.eval import digits as D
from dit_fast.eval.stats import feature_stats, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU runs: one thread


def test_frechet_distance_matches_the_reference_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.RandomState(0)
    a, b = rng.randn(300, 12), rng.randn(250, 12) @ rng.randn(12, 12) * 0.5 + 0.3
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real   # pytorch-fid's formula
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # equal covariances: only the squared mean shift remains
    assert frechet_distance(mu1, s1, mu1 + 2.0, s1) == pytest.approx(4.0 * 12, rel=1e-6)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(mu1, s1, mu2[:5], s2)


def test_digits_images_and_uint8_round_trip():
    x, y = load_digits_images(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1 and sorted(set(y.tolist())) == list(range(10))
    arr = D.to_uint8(x[:5])
    assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 3)
    assert (arr[..., 0] == arr[..., 2]).all()
    assert (D.from_uint8(arr) - x[:5]).abs().max() <= 1 / 127.5
    with pytest.raises(ValueError, match="image_size"):
        load_digits_images(12)


@pytest.mark.slow
def test_classifier_recognises_real_digits_and_is_deterministic():
    clf = D.train_classifier(16, epochs=6)
    assert clf.val_accuracy >= 0.94, clf.val_accuracy           # held-out real digits
    x, y = load_digits_images(16)
    real = D.real_feature_stats(clf)
    res = D.evaluate_samples(clf, D.to_uint8(x), y, real)
    assert res["accuracy"] >= 0.94 and res["frechet_distance"] == pytest.approx(0.0, abs=1e-4)
    # a mislabelled set is recognised as such, and uniform noise is far from the real digits
    assert D.evaluate_samples(clf, D.to_uint8(x), (y + 1) % 10, real)["accuracy"] < 0.1
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert D.evaluate_samples(clf, D.to_uint8(noise), y[:500], real)["frechet_distance"] > 10 * max(
        D.evaluate_samples(clf, D.to_uint8(x[:500]), y[:500], real)["frechet_distance"], 1e-3)
    one = D.train_classifier(8, epochs=1)
    assert torch.equal(one.model.fc2.weight, D.train_classifier(8, epochs=1).model.fc2.weight)


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, capsys):
    from PIL import Image

    from dit_fast.demo import main
    from dit_fast.train import read_metrics

    out = tmp_path / "demo"
    code = main(["--out", str(out), "--steps", "12", "--batch-size", "16", "--hidden-size", "32", "--depth", "1",
                 "--num-heads", "2", "--patch-size", "4", "--samples-per-class", "3", "--sampling-steps", "4",
                 "--classifier-epochs", "1", "--log-every", "4", "--cfg-scale", "4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "with guidance (scale 4)" in text and "without guidance" in text and "Fréchet" in text

    for name in ("samples.npz", "samples_unguided.npz"):
        npz = np.load(out / name)
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (30, 16, 16, 3)
        assert npz["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    assert not np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(out / "samples_unguided.npz")["arr_0"])
    grid = Image.open(out / "samples.png")
    assert grid.size == (2 + 10 * (16 * 4 + 2), 2 + 10 * (16 * 4 + 2))      # one row per class
    assert Image.open(out / "loss.png").size[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    for key in ("guided", "unguided"):
        assert 0.0 <= summary[key]["accuracy"] <= 1.0 and summary[key]["frechet_distance"] > 0
        assert summary[key]["num_samples"] == 30
    assert summary["guided"]["cfg_scale"] == 4 and summary["unguided"]["cfg_scale"] == 1
    assert (out / "run" / "checkpoints" / "0000012.pt").is_file()
    assert [m["step"] for m in read_metrics(out / "run")] == [4, 8, 12]
    # a second run into the same directory is refused with one line
    assert main(["--out", str(out), "--steps", "1"]) == 2
    assert "already holds a demo run" in capsys.readouterr().err


def test_demo_rejects_bad_settings(capsys, tmp_path):
    from dit_fast.demo import main

    assert main(["--out", str(tmp_path / "x"), "--samples-per-class", "1"]) == 2
    assert "--samples-per-class must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image-size", "24"])
