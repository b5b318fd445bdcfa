"""Latent extraction (image + flip, sharded) with a small random AutoencoderKL saved locally, and
training from the latents and from an ImageFolder encoded on the fly."""
import json

import numpy as np
import pytest
import torch

from dit_fast.extract_latents import main as extract_main
from dit_fast.train import ImageFolder, LatentDataset, SampleKey, make_args, read_metrics, train
from dit_fast.train.data import preprocess

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU runs: one thread

diffusers = pytest.importorskip("diffusers")

IMAGE_SIZE = 16
TINY_MODEL = dict(model="DiT-S/2", depth=1, hidden_size=32, num_heads=2, global_batch_size=4, num_workers=0,
                  device="cpu", progress=False, log_every=1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL (downsampling x2, 4 latent channels) on disk."""
    from diffusers.models import AutoencoderKL

    path = tmp_path_factory.mktemp("vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<image>: 2 classes, 5 images of assorted sizes each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (root / c).mkdir()
        for i in range(5):
            arr = rng.randint(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _vae(path):
    from diffusers.models import AutoencoderKL

    return AutoencoderKL.from_pretrained(path).eval()


def test_moments_store_both_flips_exactly(vae_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    assert extract_main(["--data-path", str(image_folder), "--out", str(out), "--image-size", str(IMAGE_SIZE),
                         "--vae", str(vae_dir), "--batch-size", "3", "--shard-size", "4", "--num-workers", "0",
                         "--store", "moments", "--device", "cpu"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 10 and meta["num_classes"] == 2 and meta["classes"] == ["cat", "dog"]
    assert [s["num"] for s in meta["shards"]] == [4, 4, 2]
    assert meta["latent_shape"] == [4, IMAGE_SIZE // 2, IMAGE_SIZE // 2] and meta["scale"] == 0.18215

    folder = ImageFolder(image_folder, IMAGE_SIZE)
    vae = _vae(vae_dir)
    shards = [torch.load(out / s["file"], weights_only=True) for s in meta["shards"]]
    lat = torch.cat([s["latents"] for s in shards])          # (10, 2 views, 2 moments, C, h, w)
    assert lat.shape == (10, 2, 2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert torch.cat([s["labels"] for s in shards]).tolist() == folder.targets
    assert torch.cat([s["indices"] for s in shards]).tolist() == list(range(10))
    from PIL import Image

    with torch.no_grad():
        for i in (0, 7):
            img = Image.open(folder.samples[i][0])
            for view, flip in ((0, False), (1, True)):
                post = vae.encode(preprocess(img, IMAGE_SIZE, flip)[None]).latent_dist
                torch.testing.assert_close(lat[i, view, 0], post.mean[0] * 0.18215, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(lat[i, view, 1], post.std[0] * 0.18215, rtol=1e-4, atol=1e-5)

    ds = LatentDataset(out)
    x, y = ds[SampleKey(7, 1, 123)]
    assert y == folder.targets[7]
    torch.testing.assert_close(x, lat[7, 1, 0] + lat[7, 1, 1] * torch.randn(
        lat.shape[3:], generator=torch.Generator().manual_seed(123)))
    assert torch.equal(ds[SampleKey(7, 1, 123)][0], x) and not torch.equal(ds[SampleKey(7, 1, 124)][0], x)

    run = tmp_path / "run"
    train(make_args(**TINY_MODEL, data_path=str(out), max_steps=3, ckpt_every=3, results_dir=str(run)))
    ck = torch.load(run / "checkpoints" / "0000003.pt", weights_only=False)
    assert ck["args"].dataset == "latents" and ck["args"].image_size == IMAGE_SIZE
    assert ck["config"]["in_channels"] == 4 and ck["config"]["input_size"] == IMAGE_SIZE // 2
    assert ck["config"]["num_classes"] == 2
    assert len(read_metrics(run)) == 3


def test_sample_store_and_training_on_the_fly(vae_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    assert extract_main(["--data-path", str(image_folder), "--out", str(out), "--image-size", str(IMAGE_SIZE),
                         "--vae", str(vae_dir), "--batch-size", "4", "--num-workers", "0", "--dtype", "float16",
                         "--device", "cpu"]) == 0
    shard = torch.load(out / "shard-r000-00000.pt", weights_only=True)
    assert shard["latents"].shape == (10, 2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert shard["latents"].dtype == torch.float16 and torch.isfinite(shard["latents"]).all()
    assert not torch.equal(shard["latents"][:, 0], shard["latents"][:, 1])
    x, _ = LatentDataset(out)[SampleKey(3, 1, 0)]
    assert x.dtype == torch.float32 and torch.equal(x, shard["latents"][3, 1].float())

    # the official path: ImageFolder + VAE in the loop
    run = tmp_path / "run"
    train(make_args(**TINY_MODEL, data_path=str(image_folder), vae=str(vae_dir), image_size=IMAGE_SIZE,
                    max_steps=2, ckpt_every=2, results_dir=str(run)))
    ck = torch.load(run / "checkpoints" / "0000002.pt", weights_only=False)
    assert ck["args"].dataset == "imagefolder" and ck["config"]["in_channels"] == 4


def test_extract_errors_are_one_line(vae_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "lat"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    argv = ["--data-path", str(image_folder), "--out", str(out), "--vae", str(vae_dir), "--device", "cpu"]
    assert extract_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds extracted latents; pass --overwrite" in err[0]
    assert extract_main(["--data-path", str(tmp_path / "none"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_training_errors_name_the_vae_and_image_size(vae_dir, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--vae '.*missing': cannot load an AutoencoderKL"):
        train(make_args(**TINY_MODEL, data_path=str(image_folder), vae=str(tmp_path / "missing"),
                        image_size=IMAGE_SIZE, max_steps=1, results_dir=str(tmp_path / "r1")))
    with pytest.raises(ValueError, match="--image-size 15 must be divisible by the VAE's downsampling factor 2"):
        train(make_args(**TINY_MODEL, data_path=str(image_folder), vae=str(vae_dir), image_size=15,
                        max_steps=1, results_dir=str(tmp_path / "r2")))


def _train_cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    flags = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
             "--global-batch-size", "4", "--device", "cpu", "--no-progress", "--log-every", "1"]
    return subprocess.run([sys.executable, "-m", "dit_fast.train", *flags, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def folder_with_a_bad_image(image_folder, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    (root / "cat" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)   # a truncated download
    return root


@pytest.mark.slow
def test_an_unreadable_image_stops_training_with_one_line(vae_dir, folder_with_a_bad_image, tmp_path):
    r = _train_cli("--data-path", folder_with_a_bad_image, "--vae", vae_dir, "--image-size", IMAGE_SIZE,
                   "--max-steps", "3", "--num-workers", "1", "--results-dir", tmp_path / "run")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith(f"python -m dit_fast.train: error: cannot read image {folder_with_a_bad_image}/cat/2.png")
    assert "pass --skip-bad-images" in err[0] and "training stopped at step" in err[0]


@pytest.mark.slow
def test_skip_bad_images_counts_them(vae_dir, folder_with_a_bad_image, tmp_path):
    import os

    run = tmp_path / "run"
    r = _train_cli("--data-path", folder_with_a_bad_image, "--vae", vae_dir, "--image-size", IMAGE_SIZE,
                   "--max-steps", "5", "--num-workers", "1", "--skip-bad-images", "--results-dir", run)
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    # as often as the sampler asked for the bad image in those 5 steps of 4
    from dit_fast.train import TrainSampler

    ds = ImageFolder(folder_with_a_bad_image, IMAGE_SIZE, skip_bad=True)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith(f"cat{os.sep}2.png")][0]
    sampler, asked = TrainSampler(ds, 1, 0, 0, 4), []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        asked += [k.index for k in sampler]
    assert asked[:20].count(bad) >= 1
    assert metrics[-1]["skipped_images"] == asked[:20].count(bad)
    log = (run / "log.txt").read_text()
    assert f"unreadable image(s) so far (replaced by the next readable one; latest: " \
           f"{folder_with_a_bad_image}/cat/2.png)" in log


def test_skip_bad_images_replaces_by_the_next_readable(folder_with_a_bad_image):
    ds = ImageFolder(folder_with_a_bad_image, IMAGE_SIZE, skip_bad=True)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("2.png") and "/cat/" in p][0]
    x, label, skipped = ds[SampleKey(bad, 0, 0)]
    x_next, label_next, none = ds[SampleKey(bad + 1, 0, 0)]
    assert torch.equal(x, x_next) and label == label_next and none == ""
    assert skipped == ds.samples[bad][0]


@pytest.mark.slow
def test_truncated_latents_shard_is_named(vae_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    assert extract_main(["--data-path", str(image_folder), "--out", str(out), "--image-size", str(IMAGE_SIZE),
                         "--vae", str(vae_dir), "--batch-size", "4", "--shard-size", "4", "--num-workers", "0",
                         "--device", "cpu"]) == 0
    shard = out / "shard-r000-00001.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = _train_cli("--data-path", out, "--max-steps", "1", "--num-workers", "0", "--results-dir", tmp_path / "run")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert f"error: latents shard {shard}: not a readable torch checkpoint (truncated or corrupt?)" in err[0]
    assert "re-run dit_fast.extract_latents" in err[0]
    assert not (tmp_path / "run").exists()             # refused before the run started
