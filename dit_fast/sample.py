"""Sample a grid of images from a DiT: `python -m dit_fast.sample`.

Drop-in for facebookresearch/DiT's `sample.py` (same flags and defaults: --model DiT-XL/2,
--image-size 256, --num-classes 1000, --cfg-scale 4.0, --num-sampling-steps 250, --seed 0, --ckpt,
--vae), plus:

  --sampler ddpm|ddim|dpm-solver++|sde-dpm-solver++   (default ddpm, as the official script; steps default to
                                      250 / 50 / 20)
  --class-labels 207 360 ...         (default: the official eight for 1000 classes, else 0..min(C,16)-1)
  --out FILE.png                     (default sample.png)
  --device cuda|cpu|cuda:1 ...       --dtype fp32|bf16       --guide-channels 3|all
  --vae mse|ema|PATH|HUB_ID|none     (mse/ema: stabilityai/sd-vae-ft-{mse,ema}; a local diffusers
                                      folder or single file; none: the model output is the image,
                                      pixel-space models; for latent models the first three latent
                                      channels are shown. Default: mse for latent (4-channel) models,
                                      none for pixel-space ones)
  --step-cache THRESH                reuse the deep blocks between steps (dit_fast.sampling.StepCache)
  --cache none|step|taylor           feature cache; taylor forecasts features between full model
                                      evaluations (dit_fast.sampling.TaylorCache; --cache-interval,
                                      --cache-order, ... default per sampler, see sampling/cache_cli.py)
  --compile / --cuda-graph           compiled / CUDA-graph captured denoising loop

With no --ckpt a randomly initialized model is used (with a warning). With --ckpt, the model's
configuration is read from the checkpoint; --model, --image-size and --num-classes, when given,
must agree with it. Bad input (a label outside the model's classes, a missing checkpoint or VAE,
an image size the checkpoint doesn't fit, a non-finite number, ...) ends with one error line naming
the argument (exit status 2), before any sampling; so does a missing optional package (Pillow: the
[sample] extra). A failed write (a full disk) is one error line too (exit status 1) and leaves no
partial file.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ._extras import MissingDependency, require
from .checkpoint import from_pretrained
from .models.dit import DiT, DiT_configs, DiT_models

OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
VAE_ALIASES = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
VAE_SCALE = 0.18215
LATENT_CHANNELS = 4      # the SD VAE's latent channels; models with other channel counts are pixel-space
VAE_FACTOR = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CLIError(Exception):
    """Bad command-line input: reported as one line, `<prog>: error: <message>`; exit status 2."""
    status = 2


class OutputError(CLIError):
    """Writing an output failed (e.g. a full disk): one line, exit status 1; no partial file is left."""
    status = 1


# ----------------------------------------------------------------------------- shared helpers
# (also used by dit_fast.sample_ddp)

def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_latent(model: DiT) -> bool:
    """Latent-space model (4 input channels, the SD VAE's); anything else is taken as pixel-space."""
    return model.in_channels == LATENT_CHANNELS


def load_model(model_name: Optional[str], image_size: Optional[int], num_classes: Optional[int],
               ckpt: Optional[str], prog: Optional[str], num_heads: Optional[int] = None) -> DiT:
    """The DiT to sample from (eval mode, fp32, CPU). Flags left as None take the checkpoint's values,
    or the official defaults (DiT-XL/2, 256, 1000) for a random model. `prog` prefixes the warning
    printed for a random model (None: no warning)."""
    if model_name is not None and model_name not in DiT_models:
        raise CLIError(f"--model: unknown model {model_name!r}; choose from {', '.join(DiT_models)}")
    if image_size is not None and image_size <= 0:
        raise CLIError(f"--image-size must be positive, got {image_size}")
    if num_classes is not None and num_classes <= 0:
        raise CLIError(f"--num-classes must be positive, got {num_classes}")
    if ckpt is None:
        model_name = model_name or "DiT-XL/2"
        image_size = image_size or 256
        num_classes = num_classes or 1000
        if image_size % VAE_FACTOR:
            raise CLIError(f"--image-size {image_size} must be divisible by {VAE_FACTOR} (the VAE's downsampling)")
        latent = image_size // VAE_FACTOR
        patch = DiT_configs[model_name]["patch_size"]
        if latent % patch:
            raise CLIError(f"--image-size {image_size}: the {latent}x{latent} latent is not divisible by "
                           f"{model_name}'s patch size {patch}")
        if prog:
            print(f"{prog}: warning: no --ckpt given: sampling from a randomly initialized {model_name} "
                  f"(the images will be noise)", file=sys.stderr)
        return DiT_models[model_name](input_size=latent, num_classes=num_classes).eval()

    if not Path(ckpt).is_file():
        raise CLIError(f"--ckpt: no checkpoint file at {ckpt!r}")
    if num_heads is not None and num_heads <= 0:
        raise CLIError(f"--num-heads must be positive, got {num_heads}")
    try:
        model = from_pretrained(ckpt, **({"num_heads": num_heads} if num_heads else {}))
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        msg = _first_line(e)
        if "num_heads" in msg:
            msg += " (use --num-heads)"
        raise CLIError(f"--ckpt: {msg}" if str(ckpt) in msg else f"--ckpt {ckpt}: cannot load a DiT from it: {msg}") from None
    cfg = model.config
    if model_name is not None:
        want = DiT_configs[model_name]
        got = {k: cfg[k] for k in want}
        if got != want:
            raise CLIError(f"--model {model_name} does not match the checkpoint (it holds depth={cfg['depth']}, "
                           f"hidden_size={cfg['hidden_size']}, patch_size={cfg['patch_size']}, "
                           f"num_heads={cfg['num_heads']})")
    if num_classes is not None and num_classes != cfg["num_classes"]:
        raise CLIError(f"--num-classes {num_classes} does not match the checkpoint, which has "
                       f"{cfg['num_classes']} classes")
    if image_size is not None:
        fits = cfg["input_size"] * (VAE_FACTOR if is_latent(model) else 1)
        if image_size != fits:
            kind = (f"{cfg['input_size']}x{cfg['input_size']} latents" if is_latent(model)
                    else f"{cfg['input_size']}x{cfg['input_size']} pixel images")
            raise CLIError(f"--image-size {image_size} does not fit the checkpoint: its model takes {kind} "
                           f"(image size {fits})")
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_vae(vae: Optional[str], model: DiT, device: torch.device, default: str = "mse"):
    """diffusers' AutoencoderKL for --vae (None for 'none'). An unset --vae is `default` for latent
    models and 'none' for pixel-space ones."""
    if vae is None:
        vae = default if is_latent(model) else "none"
    if vae.lower() == "none":
        return None
    if not is_latent(model):
        raise CLIError(f"--vae {vae}: the model works in pixel space ({model.in_channels} channels, not "
                       f"{LATENT_CHANNELS} latent channels); use --vae none")
    source = VAE_ALIASES.get(vae, vae)
    local = Path(os.path.expanduser(source))
    looks_local = (local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
                   or local.suffix in (".safetensors", ".ckpt", ".pt", ".bin"))
    if looks_local and not local.exists():
        raise CLIError(f"--vae: no VAE at {vae!r} (expected a diffusers AutoencoderKL folder or weights file, "
                       f"a hub id like stabilityai/sd-vae-ft-mse, 'mse', 'ema' or 'none')")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise CLIError(f"--vae {vae}: decoding latents needs the 'diffusers' package: pip install "
                       f"'dit_fast[diffusers]' (or pip install diffusers), or use --vae none") from None
    try:
        with _quiet_hub():
            if local.is_file():
                model_vae = AutoencoderKL.from_single_file(str(local))
            else:
                model_vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else source)
    except Exception as e:  # diffusers / huggingface_hub raise many types (OSError, HTTP errors, ...)
        where = "folder" if local.exists() else "hub id"
        raise CLIError(f"--vae: cannot load an AutoencoderKL from {where} {source!r}: {_first_line(e)}") from None
    return model_vae.to(device).eval()


class _quiet_hub:
    """Silence diffusers' / huggingface_hub's log lines and warnings (retries, deprecations) while a VAE
    loads, so that a failure ends in our one error line. Download progress bars are not affected."""

    def __enter__(self):
        import logging

        self._levels = {}
        for name in ("diffusers", "huggingface_hub"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR + 10)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        import logging

        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False


class CastModel:
    """Calls `fn` with x cast to `dtype` and returns float32 (the sampler's arithmetic stays fp32)."""

    def __init__(self, fn, dtype: torch.dtype) -> None:
        self.fn = fn
        self.__wrapped__ = fn
        self.dtype = dtype

    def __call__(self, x, t, **kwargs):
        return self.fn(x.to(self.dtype), t, **kwargs).float()


def parse_guide_channels(value: str):
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'all', got {value!r}") from None


def resolve_guide_channels(guide_channels, model: DiT):
    """--guide-channels: None -> 3 (official) for models with >= 3 channels, else 'all'."""
    if guide_channels is None:
        return 3 if model.in_channels >= 3 else "all"
    if guide_channels != "all" and not 1 <= guide_channels <= model.in_channels:
        raise CLIError(f"--guide-channels must be 'all' or in [1, {model.in_channels}] for this "
                       f"{model.in_channels}-channel model, got {guide_channels}")
    return guide_channels


def has_null_class(model: DiT) -> bool:
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes


def decode(samples: torch.Tensor, vae, model: DiT) -> torch.Tensor:
    """Images in (roughly) [-1, 1], 3 channels: VAE decoding, or the model output itself."""
    if vae is not None:
        with torch.no_grad():
            dtype = next(vae.parameters()).dtype
            return vae.decode(samples.to(dtype) / VAE_SCALE).sample.float()
    c = samples.shape[1]
    if c >= 3:
        return samples[:, :3].float()
    return samples[:, :1].float().repeat(1, 3, 1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as the official sample_ddp.py converts."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def make_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2, value_range=(-1.0, 1.0)) -> np.ndarray:
    """torchvision.utils.save_image(images, nrow=nrow, normalize=True, value_range=value_range)'s
    pixels: clamp to value_range, scale to [0, 1], tile with `padding` black pixels, round to uint8."""
    lo, hi = value_range
    x = images.detach().float().cpu().clamp(lo, hi).sub(lo).div(max(hi - lo, 1e-5))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    H, W = h + padding, w + padding
    grid = torch.zeros(c, rows * H + padding, cols * W + padding)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[:, r * H + padding: r * H + padding + h, q * W + padding: q * W + padding + w] = x[k]
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def save_png(array: np.ndarray, path: str) -> None:
    """Write the PNG atomically: a failed write (OutputError) leaves no partial file at `path`."""
    from PIL import Image

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot write the image: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_finite(args, *names: str) -> None:
    """Each of args.<name> (a number or None) must be finite: NaN / inf pass every range check."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise CLIError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def validate_sampling_args(args) -> None:
    """Checks of the flags shared by sample and sample_ddp that need no model (before any work)."""
    check_finite(args, "cfg_scale", "step_cache")
    if args.step_cache < 0:
        raise CLIError(f"--step-cache must be >= 0, got {args.step_cache}")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by sample and sample_ddp (beyond the official ones)."""
    from .diffusion.dpm_solver import SKIP_TYPES
    from .sampling import SAMPLERS
    from .sampling.cache_cli import add_cache_args

    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm (official p_sample_loop), ddim (ddim_sample_loop, eta 0), dpm-solver++ (2M) or "
                        "sde-dpm-solver++ (its stochastic variant)")
    p.add_argument("--skip-type", choices=SKIP_TYPES, default="time_uniform",
                   help="DPM-Solver++ time grid (default: time_uniform)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a plain state dict of non-standard width (default: the checkpoint's, "
                        "or the named configuration's)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (the sampler runs in fp32)")
    p.add_argument("--guide-channels", type=parse_guide_channels, default=None,
                   help="channels classifier-free guidance applies to: 3 (official; the default) or 'all' "
                        "(the default for models with fewer than 3 channels)")
    p.add_argument("--step-cache", type=float, default=0.0, metavar="THRESH",
                   help="reuse the deep blocks' output when the accumulated relative change of the first "
                        "block's output is below THRESH (0: off)")
    p.add_argument("--cache-shallow-blocks", type=int, default=1,
                   help="blocks always run with --step-cache (default 1)")
    add_cache_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the denoising step")
    p.add_argument("--cuda-graph", action="store_true", help="capture the denoising step in a CUDA graph (GPU)")


def build_sampling(args, model: DiT, device: torch.device):
    """Validate the shared sampling flags and move the model to device/dtype.
    Returns (net: the model or its StepCache, sampler, loop mode, number of steps)."""
    from .sampling import StepCache, default_steps, make_sampler
    from .sampling.cache_cli import build_cache

    steps = args.num_sampling_steps if args.num_sampling_steps is not None else default_steps(args.sampler)
    if not 1 <= steps <= 1000:
        raise CLIError(f"--num-sampling-steps must be in [1, 1000], got {steps}")
    if args.sampler == "ddpm" and steps < 2:
        raise CLIError("--num-sampling-steps 1 with --sampler ddpm: ancestral sampling needs at least 2 steps; "
                       "use --sampler ddim or dpm-solver++ for a single step")
    try:
        sampler = make_sampler(args.sampler, steps, skip_type=args.skip_type, learn_sigma=model.learn_sigma)
    except ValueError as e:
        raise CLIError(f"--num-sampling-steps {steps} with --sampler {args.sampler}: {_first_line(e)}") from None
    args.guide_channels = resolve_guide_channels(args.guide_channels, model)
    if args.cuda_graph and device.type != "cuda":
        raise CLIError(f"--cuda-graph needs a CUDA device, got {device}")
    if args.step_cache > 0 and (args.compile or args.cuda_graph):
        raise CLIError("--step-cache cannot be combined with --compile or --cuda-graph (its skip decision "
                       "runs on the host at every step)")
    mode = {(False, False): "eager", (True, False): "compile", (False, True): "cuda_graph",
            (True, True): "compile_cuda_graph"}[(bool(args.compile), bool(args.cuda_graph))]
    model = model.to(device=device, dtype=DTYPES[args.dtype])
    net = model
    if args.step_cache > 0:
        depth = len(model.blocks)
        if not 1 <= args.cache_shallow_blocks < depth:
            raise CLIError(f"--cache-shallow-blocks must be in [1, {depth - 1}] for this depth-{depth} model, "
                           f"got {args.cache_shallow_blocks}")
        net = StepCache(model, threshold=args.step_cache, shallow_blocks=args.cache_shallow_blocks)
    try:
        net = build_cache(args, net, model, steps)   # --cache none|step|taylor
    except ValueError as e:
        raise CLIError(str(e)) from None
    return net, sampler, mode, steps


def model_fn(net, use_cfg: bool, dtype: torch.dtype):
    fn = net.forward_with_cfg if use_cfg else net.forward
    return fn if dtype == torch.float32 else CastModel(fn, dtype)


# ----------------------------------------------------------------------------- sample.py

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dit_fast.sample", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=str, default=None, help="DiT-XL/2, ... (default: DiT-XL/2, or the checkpoint's)")
    p.add_argument("--vae", type=str, default=None,
                   help="mse | ema | local AutoencoderKL folder/file | hub id | none "
                        "(default: mse for latent models, none for pixel-space ones)")
    p.add_argument("--image-size", type=int, default=None, help="default: 256, or the checkpoint's")
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000, or the checkpoint's")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="default: 250 (ddpm), 50 (ddim), 20 (dpm-solver++, sde-dpm-solver++)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=str, default=None,
                   help="a DiT checkpoint (.pt / .safetensors); default: a randomly initialized model")
    p.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="class of each image (default: the official eight for 1000 classes, else 0..min(C,16)-1)")
    p.add_argument("--out", type=str, default="sample.png", help="PNG grid to write (default: sample.png)")
    p.add_argument("--nrow", type=int, default=4, help="images per row of the grid (default 4)")
    add_sampling_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "dit_fast.sample"
    args = parse_args(argv)
    try:
        out = run(args, prog)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.status
    print(f"Saved {out}")
    return 0


@torch.no_grad()
def run(args: argparse.Namespace, prog: str = "dit_fast.sample") -> str:
    from .sampling import LoopRunner

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--out: directory {out_dir!r} does not exist")
    if not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out!r}")
    if args.nrow < 1:
        raise CLIError(f"--nrow must be positive, got {args.nrow}")
    validate_sampling_args(args)
    try:
        require(["PIL"], "sample", "--out: writing the PNG")
    except MissingDependency as e:
        raise CLIError(str(e)) from None
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.image_size, args.num_classes, args.ckpt, prog, args.num_heads)

    num_classes = model.num_classes
    labels = args.class_labels
    if labels is None:
        labels = OFFICIAL_CLASS_LABELS if num_classes == 1000 else list(range(min(num_classes, 16)))
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise CLIError(f"--class-labels: {bad[0]} is outside the model's classes [0, {num_classes - 1}]")

    use_cfg = has_null_class(model)
    if not use_cfg and args.cfg_scale != 1.0:
        raise CLIError(f"--cfg-scale {args.cfg_scale}: the model has no null class (trained without label "
                       f"dropout), so classifier-free guidance is impossible; use --cfg-scale 1")
    net, sampler, mode, steps = build_sampling(args, model, device)
    vae = load_vae(args.vae, model, device)
    clip_denoised = not is_latent(model)         # pixel-space samples live in [-1, 1]

    n = len(labels)
    size = model.input_size
    z = torch.randn(n, model.in_channels, size, size, device=device)
    y = torch.tensor(labels, device=device)
    if use_cfg:
        # as the official sample.py: conditional and unconditional halves share the noise
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full((n,), num_classes, device=device, dtype=y.dtype)], 0)
        model_kwargs: Dict[str, Any] = dict(y=y, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels)
    else:
        model_kwargs = dict(y=y)
    runner = LoopRunner(model_fn(net, use_cfg, DTYPES[args.dtype]), sampler, mode=mode, clip_denoised=clip_denoised)
    samples = runner(z, model_kwargs, progress=True)
    if use_cfg:
        samples, _ = samples.chunk(2, dim=0)
    images = decode(samples, vae, model)
    save_png(make_grid(images, nrow=args.nrow), args.out)
    return args.out


if __name__ == "__main__":
    sys.exit(main())
