"""`torchrun ... -m dit_fast.sample_ddp`: sharded, resumable FID sampling."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast import DiT, save_checkpoint
from dit_fast.sample_ddp import main, shard_seed

ROOT = Path(__file__).resolve().parents[1]
NAME = "DiT-d2-h32-p2-tiny-size-8-vae-none-cfg-2.0-seed-3-ddim-4"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(m, path)
    return path


def _args(ckpt, sample_dir, n=7, batch=3):
    return ["--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--num-fid-samples", str(n),
            "--per-proc-batch-size", str(batch), "--cfg-scale", "2.0", "--sampler", "ddim",
            "--num-sampling-steps", "4", "--global-seed", "3"]


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_two_processes_gloo_match_one_process_and_resume(ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dit_fast.sample_ddp", *_args(ckpt, tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "two" / f"{NAME}.npz"
    assert f"Saved .npz file to {out}" in r.stdout
    two = _load(out)
    assert two["arr_0"].shape == (7, 8, 8, 3) and two["arr_0"].dtype == np.uint8
    assert two["labels"].shape == (7,) and two["labels"].dtype == np.int64
    assert ((0 <= two["labels"]) & (two["labels"] < 10)).all()
    shards = sorted((tmp_path / "two" / NAME).glob("shard_*.npz"))
    assert [p.name for p in shards] == [f"shard_{k:06d}.npz" for k in range(3)]

    # one process (no torchrun), same settings: the same samples, in the same order
    assert main(_args(ckpt, tmp_path / "one")) == 0
    one = _load(tmp_path / "one" / f"{NAME}.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert len(np.unique(one["arr_0"].reshape(7, -1), axis=0)) == 7          # distinct noise per sample

    # resume: finished shards are skipped, a missing one is sampled again (identically)
    folder = tmp_path / "one" / NAME
    keep = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard_*.npz")}
    (folder / "shard_000001.npz").unlink()
    (tmp_path / "one" / f"{NAME}.npz").unlink()
    assert main(_args(ckpt, tmp_path / "one")) == 0
    again = _load(tmp_path / "one" / f"{NAME}.npz")
    assert np.array_equal(again["arr_0"], one["arr_0"])
    assert (folder / "shard_000000.npz").stat().st_mtime_ns == keep["shard_000000.npz"]
    assert (folder / "shard_000002.npz").stat().st_mtime_ns == keep["shard_000002.npz"]


def test_a_corrupt_shard_is_resampled_and_settings_are_checked(ckpt, tmp_path, capsys):
    assert main(_args(ckpt, tmp_path, n=4, batch=2)) == 0
    name = NAME
    ref = _load(tmp_path / f"{name}.npz")
    (tmp_path / name / "shard_000000.npz").write_bytes(b"truncated")
    assert main(_args(ckpt, tmp_path, n=4, batch=2)) == 0
    assert np.array_equal(_load(tmp_path / f"{name}.npz")["arr_0"], ref["arr_0"])
    capsys.readouterr()
    # the same folder with settings that change the samples: one clear error line
    assert main(_args(ckpt, tmp_path, n=4, batch=2) + ["--step-cache", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds shards sampled with other settings (step_cache differ)" in err[0]


def test_shard_seeds_are_distinct():
    seeds = {shard_seed(s, k) for s in range(3) for k in range(200)}
    assert len(seeds) == 600 and all(0 <= s < 2 ** 63 for s in seeds)


def test_bad_input(ckpt, tmp_path, capsys):
    assert main(_args(ckpt, tmp_path) + ["--cfg-scale", "0.5"]) == 2
    assert "--cfg-scale must be >= 1.0" in capsys.readouterr().err
    assert main(_args(ckpt, tmp_path) + ["--image-size", "64"]) == 2
    assert "--image-size 64 does not fit the checkpoint" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--sample-dir", str(tmp_path)]) == 2
    assert "--ckpt: no checkpoint file at" in capsys.readouterr().err
