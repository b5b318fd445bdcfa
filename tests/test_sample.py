"""`python -m dit_fast.sample` and the sampling loops (dit_fast.sampling)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_fast import DiT, save_checkpoint
from dit_fast.diffusion import create_diffusion
from dit_fast.sample import main, make_grid
from dit_fast.sampling import LoopRunner, make_sampler, sample_loop
from op_helpers import perturbed_dit

ROOT = Path(__file__).resolve().parents[1]


def _tiny(in_channels=4, input_size=8, num_classes=6, seed=0, dropout=0.1):
    return perturbed_dit(seed, input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=32,
                         depth=2, num_heads=2, num_classes=num_classes, class_dropout_prob=dropout)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-latent.safetensors"
    save_checkpoint(_tiny(), path)
    return path


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-pixel.pt"
    save_checkpoint(_tiny(in_channels=3, input_size=8, num_classes=10, seed=1), path)
    return path


# ----------------------------------------------------------------------------- loops

@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_eager_loop_is_the_official_loop(kind):
    m = _tiny()
    d = create_diffusion("12")
    z = torch.randn(4, 4, 8, 8)
    kw = dict(y=torch.tensor([1, 2, 6, 6]), cfg_scale=4.0)
    torch.manual_seed(5)
    loop = d.p_sample_loop if kind == "ddpm" else d.ddim_sample_loop
    ref = loop(m.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=kw)
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    ours = sample_loop(m.forward_with_cfg, z.shape, make_sampler(kind, 12), noise=z, model_kwargs=kw)
    after_ours = torch.rand(3)
    assert torch.equal(ours, ref)
    assert torch.equal(after_ours, after_ref)          # same random stream consumed


@pytest.mark.parametrize("kind", ["ddpm", "dpm-solver++"])
@pytest.mark.slow
def test_compiled_loop_matches_eager(kind):
    """The traced step (one graph, no breaks: fullgraph=True) gives the eager samples; aot_eager keeps
    the arithmetic unchanged, so the match is exact. The runner compiles once for several batches."""
    m = _tiny()
    z = torch.randn(4, 4, 8, 8)
    sampler = make_sampler(kind, 5)
    runner = LoopRunner(m.forward_with_cfg, sampler, mode="compile",
                        compile_kwargs=dict(backend="aot_eager", fullgraph=True))
    for y in (torch.tensor([1, 2, 6, 6]), torch.tensor([0, 5, 6, 6])):
        kw = dict(y=y, cfg_scale=2.0)
        torch.manual_seed(1)
        eager = sample_loop(m.forward_with_cfg, z.shape, sampler, noise=z, model_kwargs=kw)
        torch.manual_seed(1)
        compiled = runner(z, kw)
        assert torch.equal(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm-solver++"])
def test_cuda_graph_loop_matches_eager(kind):
    m = _tiny().cuda()
    z = torch.randn(4, 4, 8, 8, device="cuda")
    sampler = make_sampler(kind, 6)
    runner = LoopRunner(m.forward_with_cfg, sampler, mode="cuda_graph")
    for y in ([1, 2, 6, 6], [3, 4, 6, 6]):
        kw = dict(y=torch.tensor(y, device="cuda"), cfg_scale=2.0)
        torch.manual_seed(2)
        eager = sample_loop(m.forward_with_cfg, z.shape, sampler, noise=z, model_kwargs=kw)
        torch.manual_seed(2)
        graphed = runner(z, kw)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_loop_errors():
    m = _tiny()
    with pytest.raises(ValueError, match="mode"):
        LoopRunner(m, make_sampler("ddim", 3), mode="graph")
    with pytest.raises(ValueError, match="CUDA"):
        LoopRunner(m, make_sampler("ddim", 3), mode="cuda_graph")(torch.randn(1, 4, 8, 8), dict(y=torch.tensor([0])))
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("euler", 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_sampler("ddpm", 0)
    with pytest.raises(ValueError, match="noise"):
        sample_loop(m, (2, 4, 8, 8), make_sampler("ddim", 3), noise=torch.randn(1, 4, 8, 8))


# ----------------------------------------------------------------------------- the CLI

def _png(path):
    return np.asarray(Image.open(path))


def test_grid_layout_is_torchvision_save_image():
    imgs = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    grid = make_grid(imgs, nrow=4, padding=2)
    assert grid.shape == (2 * 6 + 2, 4 * 6 + 2, 3) and grid.dtype == np.uint8
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()               # padding
    expected = ((imgs[4].permute(1, 2, 0) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.array_equal(grid[8:12, 2:6], expected)                        # 5th image: row 1, col 0
    assert (grid[8:12, 8:12] == 0).all()                                    # empty cell


def test_cli_matches_the_official_script(latent_ckpt, tmp_path):
    """The official sample.py flow (seed, z, [z, z], null labels, p_sample_loop on forward_with_cfg,
    first half) with the model output shown directly (--vae none)."""
    out = tmp_path / "s.png"
    labels = [0, 3, 5]
    assert main(["--ckpt", str(latent_ckpt), "--vae", "none", "--num-sampling-steps", "6", "--seed", "7",
                 "--cfg-scale", "3.0", "--class-labels", *map(str, labels), "--out", str(out)]) == 0
    torch.manual_seed(7)
    from dit_fast import from_pretrained
    model = from_pretrained(latent_ckpt)
    z = torch.randn(3, 4, 8, 8)
    z = torch.cat([z, z])
    y = torch.tensor(labels + [6, 6, 6])
    samples = create_diffusion("6").p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                                  model_kwargs=dict(y=y, cfg_scale=3.0))
    expected = make_grid(samples.chunk(2)[0][:, :3], nrow=4)
    assert np.array_equal(_png(out), expected)


def test_cli_pixel_model_solvers_and_flags(pixel_ckpt, tmp_path):
    outs = {}
    for sampler in ("ddim", "dpm-solver++"):
        out = tmp_path / f"{sampler}.png"
        assert main(["--ckpt", str(pixel_ckpt), "--sampler", sampler, "--num-sampling-steps", "4", "--num-heads", "2",
                     "--out", str(out), "--guide-channels", "all", "--dtype", "bf16"]) == 0
        outs[sampler] = _png(out)
        # default labels for a 10-class model: 0..9, 4 per row, 8x8 pixel images
        assert outs[sampler].shape == (3 * 10 + 2, 4 * 10 + 2, 3)
    out = tmp_path / "cached.png"
    assert main(["--ckpt", str(pixel_ckpt), "--sampler", "ddpm", "--num-sampling-steps", "8", "--step-cache", "0.3",
                 "--num-heads", "2",
                 "--class-labels", "1", "2", "--out", str(out), "--nrow", "2"]) == 0
    assert _png(out).shape == (12, 22, 3)


@pytest.mark.slow
def test_cli_decodes_with_a_local_vae(latent_ckpt, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4,
                                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                  sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "v.png"
    assert main(["--ckpt", str(latent_ckpt), "--vae", str(tmp_path / "vae"), "--num-sampling-steps", "2",
                 "--class-labels", "1", "--out", str(out)]) == 0
    assert _png(out).shape == (64 + 4, 64 + 4, 3)             # 8x8 latents -> 64x64 image


@pytest.mark.parametrize("args,needle", [
    (["--class-labels", "0", "6"], "--class-labels: 6 is outside the model's classes [0, 5]"),
    (["--class-labels", "-1"], "--class-labels: -1"),
    (["--image-size", "128"], "--image-size 128 does not fit the checkpoint"),
    (["--vae", "./no/such/vae"], "--vae: no VAE at"),
    (["--num-classes", "1000"], "--num-classes 1000 does not match"),
    (["--model", "DiT-XL/2"], "--model DiT-XL/2 does not match the checkpoint"),
    (["--model", "DiT-Q/3"], "--model: unknown model"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device"),
    (["--step-cache", "0.1", "--compile"], "--step-cache cannot be combined"),
    (["--guide-channels", "5"], "--guide-channels"),
    (["--out", "/no/such/dir/x.png"], "--out: directory"),
    (["--out", "x.jpg"], "--out must name a .png"),
    (["--sampler", "dpm-solver++", "--num-sampling-steps", "2000"], "--num-sampling-steps"),
])
def test_cli_bad_input_is_one_error_line(latent_ckpt, tmp_path, capsys, args, needle):
    argv = ["--ckpt", str(latent_ckpt), "--vae", "none", "--num-sampling-steps", "2", "--out", str(tmp_path / "o.png")]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dit_fast.sample: error: ") and needle in err[0], err


def test_cli_missing_checkpoint_and_pixel_vae(pixel_ckpt, tmp_path, capsys):
    # a plain state dict of non-standard width needs --num-heads
    assert main(["--ckpt", str(pixel_ckpt), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot infer num_heads" in err[0] and "--num-heads" in err[0]
    assert main(["--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"dit_fast.sample: error: --ckpt: no checkpoint file at "
                                               f"{str(tmp_path / 'nope.pt')!r}")
    assert main(["--ckpt", str(pixel_ckpt), "--vae", "mse", "--num-heads", "2", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vae mse: the model works in pixel space" in err[0]


@pytest.mark.slow
def test_module_entry_point_random_model(tmp_path):
    """`python -m dit_fast.sample` with no --ckpt: a warning, a progress bar, a PNG."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "dit_fast.sample", "--model", "DiT-S/8", "--image-size", "64",
                        "--vae", "none", "--num-sampling-steps", "3", "--class-labels", "1", "2",
                        "--out", str(tmp_path / "r.png")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: no --ckpt given: sampling from a randomly initialized DiT-S/8" in r.stderr
    assert "3/3" in r.stderr                                   # tqdm over the steps
    assert _png(tmp_path / "r.png").shape == (12, 22, 3)
