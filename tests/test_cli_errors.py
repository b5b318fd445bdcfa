"""Bad input and failures met through the command lines, run as a user runs them (subprocesses):
one error line naming the argument or file, exit status 2 for bad input (1 for a failed write),
nothing written, optional packages checked before any work."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_fast import save_checkpoint
from op_helpers import perturbed_dit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(module, *args, block=(), cwd=None, timeout=180):
    """`python -m module args`; `block`: packages made unimportable (as if not installed)."""
    code = ("import runpy, sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
            + f"sys.argv[0] = {module!r}\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def one_error_line(r, prog, needle, status=2):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and needle in lines[0], r.stderr
    return lines[0]


def _tiny(learn_sigma=True, in_channels=3, seed=0):
    return perturbed_dit(seed, input_size=8, patch_size=4, in_channels=in_channels, hidden_size=32, depth=1,
                         num_heads=2, num_classes=4, learn_sigma=learn_sigma)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(_tiny(), path)
    return path


# ----------------------------------------------------------------------------- sample

SAMPLE = "dit_fast.sample"


@pytest.mark.parametrize("scale", ["nan", "inf"])
@pytest.mark.slow
def test_sample_non_finite_cfg_scale(ckpt, tmp_path, scale):
    # used to write an all-black PNG and exit 0
    out = tmp_path / "s.png"
    r = run_cli(SAMPLE, "--ckpt", ckpt, "--num-sampling-steps", "2", "--out", out, "--cfg-scale", scale)
    one_error_line(r, SAMPLE, f"--cfg-scale must be a finite number, got {scale}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sample_one_ddpm_step_refused_up_front(ckpt, tmp_path):
    r = run_cli(SAMPLE, "--ckpt", ckpt, "--num-sampling-steps", "1", "--out", tmp_path / "s.png")
    one_error_line(r, SAMPLE, "--num-sampling-steps 1 with --sampler ddpm: ancestral sampling needs at least 2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
@pytest.mark.slow
def test_sample_learn_sigma_false_checkpoint(tmp_path, sampler):
    """A checkpoint of a fixed-variance model (learn_sigma=False) samples through the CLI, as
    create_diffusion(learn_sigma=False)'s p_sample_loop does."""
    from dit_fast.diffusion import create_diffusion
    from dit_fast.sample import make_grid
    from PIL import Image

    model = _tiny(learn_sigma=False)
    path = tmp_path / "fixed.pt"
    torch.save(model.state_dict(), path)            # a plain state dict: learn_sigma inferred from shapes
    out = tmp_path / "s.png"
    r = run_cli(SAMPLE, "--ckpt", path, "--num-heads", "2", "--sampler", sampler, "--num-sampling-steps", "3",
                "--class-labels", "1", "2", "--cfg-scale", "2", "--seed", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    if sampler == "ddpm":  # the official sample.py flow: seed, build and load the model, draw z
        from dit_fast import from_pretrained

        torch.manual_seed(5)
        model = from_pretrained(path, num_heads=2)
        z = torch.randn(2, 3, 8, 8)
        z = torch.cat([z, z])
        y = torch.tensor([1, 2, 4, 4])
        s = create_diffusion("3", learn_sigma=False).p_sample_loop(
            model.forward_with_cfg, z.shape, z, clip_denoised=True, model_kwargs=dict(y=y, cfg_scale=2.0))
        assert np.array_equal(np.asarray(Image.open(out)), make_grid(s.chunk(2)[0], nrow=4))


@pytest.mark.slow
def test_sample_without_pillow_says_so_before_sampling(ckpt, tmp_path):
    r = run_cli(SAMPLE, "--ckpt", ckpt, "--num-sampling-steps", "2", "--out", tmp_path / "s.png", block=["PIL"])
    line = one_error_line(r, SAMPLE, "--out: writing the PNG needs pillow, which is not installed")
    assert "pip install 'dit_fast[sample]'" in line
    assert list(tmp_path.iterdir()) == [] and "it/s" not in r.stderr     # no sampling progress bar ran


@pytest.mark.parametrize("name, content", [("empty.pt", b""), ("random.pt", bytes(range(256)) * 8),
                                           ("bad.safetensors", b"\x10" + b"\0" * 7 + b"{not json}......")],
                         ids=["empty", "random", "bad-header"])
@pytest.mark.slow
def test_sample_unreadable_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    r = run_cli(SAMPLE, "--ckpt", path, "--out", tmp_path / "s.png")
    line = one_error_line(r, SAMPLE, f"--ckpt: checkpoint {path}: ")
    assert "weights_only" not in line


def _tmpfs_available():
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt || "
                        "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True)
    return r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare + tmpfs (a user mount namespace)")


def run_on_full_disk(tmp_path, command):
    """Run `command` (a shell string; $FULL is the directory) in a private mount namespace where $FULL is
    a full 64 KiB tmpfs; prints the exit status and the directory listing after it."""
    full = tmp_path / "full"
    full.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {full} && "
              f"(head -c 1000000 /dev/zero > {full}/filler 2>/dev/null; true) && "
              f"FULL={full}; {command}; echo \"status=$?\"; ls -A {full}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV,
                          timeout=180)


@needs_tmpfs
@pytest.mark.slow
def test_sample_on_a_full_disk_leaves_no_partial_png(ckpt, tmp_path):
    r = run_on_full_disk(tmp_path, f"{sys.executable} -m dit_fast.sample --ckpt {ckpt} --num-sampling-steps 2 "
                                   f"--class-labels 0 1 2 3 0 1 2 3 --out $FULL/s.png")
    out_lines = r.stdout.strip().splitlines()
    assert out_lines[-2:] == ["status=1", "filler"], (r.stdout, r.stderr)   # no s.png, no temporary
    err = [ln for ln in r.stderr.strip().splitlines() if "it/s]" not in ln and "%|" not in ln]
    assert len(err) == 1 and err[0].startswith(f"{SAMPLE}: error: --out ") and "No space left on device" in err[0]


@pytest.mark.slow
def test_sample_failed_write_leaves_no_partial_png(ckpt, tmp_path):
    """The same, by a writer that fails midway (for machines without user namespaces)."""
    code = ("import errno, sys, PIL.Image\n"
            "def save(self, fp, *a, **k):\n"
            "    open(fp, 'wb').write(b'partial')\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "PIL.Image.Image.save = save\n"
            "from dit_fast.sample import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "s.png"
    r = subprocess.run([sys.executable, "-c", code, "--ckpt", str(ckpt), "--num-sampling-steps", "2", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=180)
    err = [ln for ln in r.stderr.strip().splitlines() if "%|" not in ln]
    assert r.returncode == 1 and err == [f"{SAMPLE}: error: --out {out}: cannot write the image: "
                                         f"No space left on device"], r.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- sample_ddp

SAMPLE_DDP = "dit_fast.sample_ddp"


@pytest.mark.parametrize("scale", ["nan", "inf"])
@pytest.mark.slow
def test_sample_ddp_non_finite_cfg_scale(ckpt, tmp_path, scale):
    # NaN used to pass the >= 1 check, sample without guidance and name the folder cfg-nan
    r = run_cli(SAMPLE_DDP, "--ckpt", ckpt, "--sample-dir", tmp_path / "samples", "--num-fid-samples", "2",
                "--num-sampling-steps", "2", "--cfg-scale", scale)
    one_error_line(r, SAMPLE_DDP, f"--cfg-scale must be a finite number, got {scale}")
    assert list(tmp_path.iterdir()) == []


def test_sample_ddp_failed_shard_write(ckpt, tmp_path, capsys, monkeypatch):
    import errno

    from dit_fast import sample_ddp

    def savez(path, **arrays):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample_ddp.np, "savez", savez)
    args = ["--ckpt", str(ckpt), "--sample-dir", str(tmp_path), "--num-fid-samples", "2", "--per-proc-batch-size", "2",
            "--num-sampling-steps", "2", "--sampler", "ddim"]
    assert sample_ddp.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{SAMPLE_DDP}: error: cannot write ") and err[-1].endswith("No space left on device")
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".npz"]


# ----------------------------------------------------------------------------- demo

DEMO = "python -m dit_fast.demo"


@pytest.mark.parametrize("missing, package", [("sklearn", "scikit-learn"), ("PIL", "pillow"),
                                              ("matplotlib", "matplotlib")])
@pytest.mark.slow
def test_demo_checks_its_packages_before_training(tmp_path, missing, package):
    r = run_cli("dit_fast.demo", "--out", tmp_path / "demo", block=[missing])
    line = one_error_line(r, DEMO, f"the demo needs {package}, which is not installed")
    assert "pip install 'dit_fast[demo]'" in line
    assert r.stdout == "" and not (tmp_path / "demo").exists()          # nothing trained, nothing written


@pytest.mark.parametrize("flag, value", [("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--lr", "nan"),
                                         ("--lr", "inf"), ("--ema-decay", "nan")])
def test_demo_non_finite_numbers(tmp_path, capsys, flag, value):
    from dit_fast.demo import main

    assert main(["--out", str(tmp_path / "demo"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{DEMO}: error: {flag} must be a finite number, got {value}"]
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_train_digits_without_scikit_learn(tmp_path):
    r = run_cli("dit_fast.train", "--dataset", "digits", "--results-dir", tmp_path / "run", block=["sklearn"])
    one_error_line(r, "python -m dit_fast.train", "--dataset digits needs scikit-learn, which is not installed")


# ----------------------------------------------------------------------------- FID

@pytest.mark.slow
def test_fid_of_two_statistics_files_needs_no_weights(tmp_path):
    """Both inputs precomputed (mu, sigma): no Inception weights are looked for."""
    from dit_fast.eval.fid import frechet_distance

    g = np.random.default_rng(0)
    fa, fb = g.normal(size=(50, 4)), g.normal(0.5, 1.0, size=(40, 4))
    for name, f in (("a", fa), ("b", fb)):
        np.savez(tmp_path / f"{name}.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    env_cache = tmp_path / "empty-cache"                 # no weights anywhere
    r = subprocess.run([sys.executable, "-m", "dit_fast.eval.fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
                       capture_output=True, text=True, timeout=120,
                       env={**ENV, "DIT_FAST_CACHE": str(env_cache), "DIT_FAST_FID_WEIGHTS": ""})
    assert r.returncode == 0, r.stderr
    expected = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert float(r.stdout.split("FID:")[1].split()[0]) == pytest.approx(expected, abs=1e-5)
    # one file of images still needs them, and says so
    np.savez(tmp_path / "img.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    r = subprocess.run([sys.executable, "-m", "dit_fast.eval.fid", str(tmp_path / "a.npz"), str(tmp_path / "img.npz")],
                       capture_output=True, text=True, timeout=120,
                       env={**ENV, "DIT_FAST_CACHE": str(env_cache), "DIT_FAST_FID_WEIGHTS": ""})
    one_error_line(r, "dit_fast.eval.fid", "--weights: no Inception weights at")
