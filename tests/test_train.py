"""Training: checkpoints, EMA, exact resume (also after SIGKILL), NaN stop, DDP on CPU, CLI errors.

Every run here is tiny (a one-block DiT on 8x8 digits, batch 8) and runs with one CPU thread.
"""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast import DiT
from dit_fast.checkpoint import from_pretrained
from dit_fast.models.dit import get_2d_sincos_pos_embed
from dit_fast.train import TrainingError, main, make_args, read_metrics, train, update_ema
from dit_fast.train.data import SampleKey, TrainSampler, center_crop_arr, preprocess
from dit_fast.train.state import atomic_save, list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU runs: one thread

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="digits", image_size=8, model="DiT-S/4", depth=1, hidden_size=32, num_heads=2,
            global_batch_size=8, num_workers=0, device="cpu", progress=False, log_every=1)
TINY_FLAGS = ["--dataset", "digits", "--image-size", "8", "--model", "DiT-S/4", "--depth", "1",
              "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0",
              "--device", "cpu", "--no-progress", "--log-every", "1"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), f"opt state {i}.{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 30-step run (checkpoints at 10, 20, 30)."""
    run = tmp_path_factory.mktemp("ref")
    torch.set_num_threads(1)
    train(make_args(**TINY, max_steps=30, ckpt_every=10, results_dir=str(run)))
    return run


# --------------------------------------------------------------------------- outputs

def test_checkpoints_are_official_and_load_strictly(reference):
    ckpts = list_checkpoints(reference / "checkpoints")
    assert [s for s, _ in ckpts] == [10, 20, 30]
    assert [p.name for _, p in ckpts] == ["0000010.pt", "0000020.pt", "0000030.pt"]
    ck = _load(ckpts[-1][1])
    for key in ("model", "ema", "opt", "args", "step", "rng", "config"):
        assert key in ck
    assert isinstance(ck["args"], argparse.Namespace)
    assert (ck["args"].model, ck["args"].image_size, ck["args"].num_classes) == ("DiT-S/4", 8, 10)
    assert ck["step"] == 30
    model = DiT(**ck["config"])
    model.load_state_dict(ck["model"], strict=True)
    model.load_state_dict(ck["ema"], strict=True)
    ema_model = from_pretrained(ckpts[-1][1])            # the EMA weights, via the config stored with them
    assert torch.equal(ema_model.final_layer.linear.weight, ck["ema"]["final_layer.linear.weight"])
    # EMA leaves the frozen pos_embed exactly at its sin-cos value and lags behind the model
    sincos = torch.from_numpy(get_2d_sincos_pos_embed(32, 2)).float().unsqueeze(0)
    assert torch.equal(ck["ema"]["pos_embed"], sincos) and torch.equal(ck["model"]["pos_embed"], sincos)
    assert not torch.equal(ck["ema"]["final_layer.linear.weight"], ck["model"]["final_layer.linear.weight"])

    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert {"step", "loss", "steps_per_sec", "img_per_sec"} <= set(r)
        assert math.isfinite(r["loss"]) and r["img_per_sec"] == pytest.approx(r["steps_per_sec"] * 8)
    assert (reference / "log.txt").read_text().count("Train Loss") == 30


def test_update_ema_is_the_official_formula_and_skips_frozen():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    ema = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    for p in ema.parameters():
        p.requires_grad_(False)
    ema.pos_embed.data.add_(1.0)            # a frozen parameter must be left alone
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, model, decay=0.9)
    for name, p in model.named_parameters():
        got = dict(ema.named_parameters())[name]
        if name == "pos_embed":
            assert torch.equal(got, before[name])
        else:
            expected = before[name].clone().mul_(0.9).add_(p.detach(), alpha=0.1)
            assert torch.equal(got, expected), name
    with pytest.raises(ValueError, match="decay"):
        update_ema(ema, model, decay=1.5)


def test_atomic_save_keeps_previous_file_when_a_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "0000001.pt"
    atomic_save({"x": torch.ones(3)}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["0000001.pt"]


def test_keep_last_and_refusing_to_overwrite_a_run(tmp_path):
    run = tmp_path / "run"
    train(make_args(**TINY, max_steps=4, ckpt_every=1, keep_last=2, results_dir=str(run)))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 4]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(make_args(**TINY, max_steps=4, results_dir=str(run)))


# --------------------------------------------------------------------------- exact resume

def test_resume_logs_the_same_losses(reference, tmp_path):
    run = tmp_path / "run"
    train(make_args(**TINY, max_steps=10, ckpt_every=10, results_dir=str(run)))
    summary = train(make_args(**TINY, max_steps=20, ckpt_every=10, results_dir=str(run), resume=str(run)))
    assert summary["start_step"] == 10 and summary["step"] == 20
    ref, got = _losses(reference), _losses(run)
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(11, 21)] == [ref[s] for s in range(11, 21)]
    _assert_same_state(_load(run / "checkpoints" / "0000020.pt"), _load(reference / "checkpoints" / "0000020.pt"))


def test_resume_from_python_takes_the_saved_arguments(reference, tmp_path):
    """make_args(resume=RUN, max_steps=N): everything left at its default comes from the checkpoint."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / "0000010.pt", run / "checkpoints")
    summary = train(make_args(resume=str(run), max_steps=12, progress=False))
    assert summary["results_dir"] == str(run.resolve()) and summary["step"] == 12
    ref, got = _losses(reference), _losses(run)
    assert [got[s] for s in (11, 12)] == [ref[s] for s in (11, 12)]


@pytest.mark.slow
def test_resume_after_sigkill_between_checkpoints(reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dit_fast.train", *TINY_FLAGS, "--max-steps", "30", "--ckpt-every", "10",
           "--results-dir", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file():
                steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.endswith("}")]
                if steps and steps[-1] >= 12 and (run / "checkpoints" / "0000010.pt").is_file():
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    logged = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.endswith("}")]
    last_ckpt = list_checkpoints(run / "checkpoints")[-1][0]
    assert last_ckpt < 30 and max(logged) > last_ckpt, "the kill did not land between two checkpoints"

    summary = train(make_args(**TINY, max_steps=30, ckpt_every=10, results_dir=str(run), resume=str(run)))
    assert summary["start_step"] == last_ckpt
    ref, got = _losses(reference), _losses(run)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))   # the killed run's extra lines dropped
    assert [got[s] for s in range(last_ckpt + 1, 31)] == [ref[s] for s in range(last_ckpt + 1, 31)]
    _assert_same_state(_load(run / "checkpoints" / "0000030.pt"), _load(reference / "checkpoints" / "0000030.pt"))


# --------------------------------------------------------------------------- failures

class _NaNAfter(torch.utils.data.Dataset):
    """Digits-like (1, 8, 8) data that turns to NaN after `good` items have been read."""

    def __init__(self, good):
        self.good, self.reads = good, 0

    def __len__(self):
        return 64

    def __getitem__(self, i):
        self.reads += 1
        x = torch.full((1, 8, 8), 0.5 if i % 2 else -0.5)
        return (x if self.reads <= self.good else x * float("nan")), i % 10


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = make_args(**{**TINY, "dataset": "auto"}, num_classes=10, max_steps=10, ckpt_every=2,
                     results_dir=str(run))
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 .*0000002\.pt"):
        train(args, dataset=_NaNAfter(good=1 + 3 * 8))   # 1: the probe of the sample shape
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    ck = _load(run / "checkpoints" / "0000002.pt")
    DiT(**ck["config"]).load_state_dict(ck["model"], strict=True)     # the stored config rebuilds the model
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())  # saved before the NaN
    assert "loss is nan at step 4" in (run / "log.txt").read_text()


def test_nan_latents_exit_1_with_one_line(tmp_path, capsys):
    lat = tmp_path / "lat"
    lat.mkdir()
    torch.save({"latents": torch.full((16, 2, 4, 4, 4), float("nan")), "labels": torch.zeros(16, dtype=torch.long),
                "indices": torch.arange(16)}, lat / "shard-r000-00000.pt")
    (lat / "meta.json").write_text(json.dumps({
        "format": "dit_fast.latents/1", "image_size": 32, "store": "sample", "latent_shape": [4, 4, 4],
        "num_classes": 2, "shards": [{"file": "shard-r000-00000.pt", "num": 16}]}))
    code = main(["--data-path", str(lat), "--model", "DiT-S/4", "--depth", "1", "--hidden-size", "32",
                 "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0", "--no-progress",
                 "--results-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "loss is nan at step 1" in err[0], err


@pytest.mark.parametrize("argv, env, needle", [
    (["--model", "DiT-S/2"], {}, "--data-path is required"),
    (["--data-path", "/no/such/dir"], {}, "--data-path '/no/such/dir' does not exist"),
    (["--dataset", "digits", "--model", "DiT-Q/3"], {}, "--model: unknown model 'DiT-Q/3'"),
    (["--dataset", "digits", "--global-batch-size", "8"], {"WORLD_SIZE": "3"},
     "--global-batch-size 8 must be divisible by the world size 3"),
    (["--dataset", "digits", "--max-steps", "0"], {}, "--max-steps must be >= 1"),
    (["--dataset", "digits", "--image-size", "12"], {}, "--image-size must be 8, 16 or 32"),
    (["--dataset", "digits", "--num-classes", "5"], {}, "--num-classes 5: the data has 10 classes"),
    (["--dataset", "digits", "--hidden-size", "30"], {}, "model configuration"),
    (["--dataset", "digits", "--precision", "fp8"], {}, "--precision"),
    (["--resume", "/no/such/run"], {}, "--resume '/no/such/run': no such file or directory"),
])
def test_bad_arguments_get_one_error_line(argv, env, needle, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [*argv, "--results-dir", str(tmp_path / "run"), "--num-workers", "0", "--device", "cpu"]
    try:
        code = main(argv)
    except SystemExit as e:   # argparse-level errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.slow
def test_cli_error_is_one_line_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dit_fast.cli", "train", "--data-path", str(tmp_path / "nope")],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"dit-fast train: error: --data-path {str(tmp_path / 'nope')!r} does not exist"]


def test_argparse_errors_are_reported_by_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["--precision", "fp8"])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        main(["--precision", "fp8"])
    assert "--precision" in capsys.readouterr().err


def test_dit_fast_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    from dit_fast import cli

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dit-fast"] == "dit_fast.cli:main"
    module, func = scripts["dit-fast"].split(":")
    assert getattr(__import__(module, fromlist=[func]), func) is cli.main


def test_cli_lists_commands(capsys):
    from dit_fast import cli

    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "train" in out and "extract-latents" in out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------- variants

def test_grad_checkpointing_is_exact_and_bf16_trains(tmp_path):
    runs = {}
    for name, extra in (("plain", {}), ("ckpt", {"grad_checkpointing": True}), ("bf16", {"precision": "bf16"})):
        train(make_args(**TINY, max_steps=3, ckpt_every=3, results_dir=str(tmp_path / name), **extra))
        runs[name] = _losses(tmp_path / name)
    assert runs["ckpt"] == runs["plain"]
    assert all(math.isfinite(v) for v in runs["bf16"].values())
    assert runs["bf16"] != runs["plain"]          # autocast really ran in bfloat16
    from dit_fast.ops.linear import cpu_isa_info  # bf16 without bf16 dot products: a warning
    slow = "--precision bf16 on a CPU without bf16 dot products"
    assert (slow in (tmp_path / "bf16" / "log.txt").read_text()) == (not cpu_isa_info()["native_bf16"])
    assert slow not in (tmp_path / "plain" / "log.txt").read_text()


def test_worker_processes_read_the_same_batches(reference, tmp_path):
    """The data order and augmentation do not depend on --num-workers (nor on worker seeding)."""
    run = tmp_path / "run"
    train(make_args(**{**TINY, "num_workers": 2}, max_steps=3, ckpt_every=3, results_dir=str(run)))
    ref, got = _losses(reference), _losses(run)
    assert [got[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]


class _Constant(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.full((1, 8, 8), (i % 5) / 5 - 0.5), i % 2


def test_epochs_bound_the_run_and_drop_the_partial_batch(tmp_path):
    run = tmp_path / "run"
    summary = train(make_args(**{**TINY, "dataset": "auto"}, num_classes=2, epochs=2, ckpt_every=100, results_dir=str(run)),
                    dataset=_Constant())
    assert summary["step"] == 4 and summary["epoch"] == 2          # 20 samples, batch 8: 2 steps per epoch
    assert [r["epoch"] for r in read_metrics(run)] == [0, 0, 1, 1]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]   # the last step is always saved
    ck = _load(run / "checkpoints" / "0000004.pt")
    assert ck["config"]["num_classes"] == 2 and ck["config"]["in_channels"] == 1


def test_unconditional_has_no_label_dropout(tmp_path):
    train(make_args(**TINY, num_classes=1, max_steps=2, ckpt_every=2, results_dir=str(tmp_path / "run")))
    ck = _load(tmp_path / "run" / "checkpoints" / "0000002.pt")
    assert ck["config"]["num_classes"] == 1 and ck["config"]["class_dropout_prob"] == 0.0
    assert ck["model"]["y_embedder.embedding_table.weight"].shape[0] == 1   # no null-class row


def test_sampler_order_is_seeded_split_and_resumable():
    data = list(range(50))
    a0 = TrainSampler(data, 2, 0, seed=3, batch_size=4)
    a1 = TrainSampler(data, 2, 1, seed=3, batch_size=4)
    assert a0.steps_per_epoch == 6          # 25 per rank, full batches only
    k0, k1 = list(a0), list(a1)
    assert all(isinstance(k, SampleKey) for k in k0)
    assert not {k.index for k in k0} & {k.index for k in k1}
    flips = {k.index: (k.flip, k.seed) for k in k0 + k1}   # one flip and seed per index and epoch
    assert len(flips) == 48 and {f for f, _ in flips.values()} == {0, 1}
    again = TrainSampler(data, 2, 0, seed=3, batch_size=4)
    again.set_epoch(0, start_batch=2)
    assert list(again) == k0[8:] and len(again) == 16
    again.set_epoch(1)
    assert [k.index for k in again] != [k.index for k in k0]
    other = TrainSampler(data, 2, 0, seed=4, batch_size=4)
    assert [k.index for k in other] != [k.index for k in k0]


def test_preprocessing_is_the_official_transform():
    from PIL import Image

    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 256, (300, 500, 3), dtype=np.uint8))
    crop = center_crop_arr(img, 64)
    assert crop.size == (64, 64)
    x, xf = preprocess(img, 64, flip=False), preprocess(img, 64, flip=True)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(xf, x.flip(-1))
    expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    assert torch.equal(x, (expected - 0.5) / 0.5)
    assert x.min() >= -1 and x.max() <= 1


# --------------------------------------------------------------------------- DDP

@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "dit_fast.train", *TINY_FLAGS, "--ckpt-every", "2"]
    res = subprocess.run([*base, "--max-steps", "3", "--results-dir", str(run)], env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]               # logged once, by rank 0
    for r in records:
        per_rank = r["loss_per_rank"]
        assert len(per_rank) == 2 and per_rank[0] != per_rank[1]   # each rank saw its own half-batch
        assert r["loss"] == pytest.approx(sum(per_rank) / 2, rel=1e-9)   # the logged loss is all-reduced
        assert r["img_per_sec"] == pytest.approx(r["steps_per_sec"] * 8)
    ck = _load(run / "checkpoints" / "0000002.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    DiT(**ck["config"]).load_state_dict(ck["model"], strict=True)

    # resume both ranks from step 2: step 3 is logged exactly as before
    res = subprocess.run([*base, "--max-steps", "3", "--results-dir", str(tmp_path / "resumed"),
                          "--resume", str(run / "checkpoints" / "0000002.pt")],
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == [records[2]["loss"]]


# --------------------------------------------------------------------------- errors met through the CLI

def _train_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dit_fast.train", *TINY_FLAGS, *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_resume_with_another_width_is_one_full_line(reference, tmp_path):
    r = _train_cli("--resume", reference / "checkpoints" / "0000010.pt", "--hidden-size", "64", "--max-steps", "12",
                   "--results-dir", tmp_path / "run")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "the checkpoint does not match this model configuration (depth 1, width 64, patch 4): shape mismatch: " \
           "pos_embed is (1, 4, 32) in the checkpoint, (1, 4, 64) in the model (+" in err[0]


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"),
                                         ("--ema-decay", "nan"), ("--mlp-ratio", "inf")])
def test_non_finite_hyperparameters_are_refused(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([flag, value, "--dataset", "digits", "--results-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"{flag} must be a finite number, got {value}" in err[0]


def test_nan_between_log_steps_names_its_step_and_saves_nothing_after(tmp_path):
    """Losses are read back at log / checkpoint steps only (no host sync per step): a NaN at step 4 is
    found at step 6, before its update; no checkpoint holds the weights updated since."""
    run = tmp_path / "run"
    args = make_args(**{**TINY, "dataset": "auto", "log_every": 3}, num_classes=10, max_steps=12, ckpt_every=2,
                     results_dir=str(run))
    args.ckpt_every = 6
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 \(epoch 0\); training stopped at step 6 .*saving "
                                            r"no weights updated since \(no checkpoint was written yet\)"):
        train(args, dataset=_NaNAfter(good=1 + 3 * 8))
    assert list_checkpoints(run / "checkpoints") == []
    assert [m["step"] for m in read_metrics(run)] == [3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter (needs a GPU)")
def test_no_host_sync_between_log_steps_on_cuda(tmp_path, monkeypatch):
    syncs = []
    real = torch.Tensor.__int__

    def counted(self):
        syncs.append(self.device.type)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__int__", counted)
    train(make_args(**{**TINY, "device": "cuda", "log_every": 5}, max_steps=10, ckpt_every=10,
                    results_dir=str(tmp_path / "run")))
    assert syncs.count("cuda") == 2          # the non-finite checks of steps 5 and 10


@pytest.mark.skipif(shutil.which("unshare") is None or sys.platform != "linux", reason="needs unshare (Linux)")
@pytest.mark.slow
def test_disk_full_while_checkpointing_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cmd = " ".join([sys.executable, "-m", "dit_fast.train", *TINY_FLAGS, "--max-steps", "2", "--ckpt-every", "2",
                    "--results-dir", str(run)])
    # a private 128 KiB tmpfs: room for the logs, not for a checkpoint
    script = f"mount -t tmpfs -o size=128k tmpfs {run} && {cmd}; echo status=$?; ls -A {run}/checkpoints"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    if "mount:" in r.stderr or "unshare:" in r.stderr:
        pytest.skip("no user mount namespace here")
    assert r.stdout.strip().splitlines()[-1] == "status=1", (r.stdout, r.stderr)   # no checkpoint, no temporary
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m dit_fast.train: error: cannot write checkpoint "), r.stderr
    assert "0000002.pt: No space left on device; training stopped at step 2" in err[0]
