"""The embedded demo: train a class-conditional DiT on a laptop CPU and check what it learned.

    python -m dit_fast.demo --out DIR        (or: dit-fast demo --out DIR)

1. trains a small digits classifier (a CNN) on scikit-learn's bundled 8x8 digits (1,797 images,
   10 classes), upscaled to 16x16 (or 32x32) -- the judge;
2. trains a small class-conditional DiT in pixel space on the same digits with the real training
   code (`dit_fast.train`: AdamW, EMA, label dropout for classifier-free guidance, checkpoints);
3. samples every class from the EMA weights with and without classifier-free guidance;
4. reports how many samples the classifier recognises as their conditioning class and the Fréchet
   distance between real and generated digits in the classifier's feature space.

Writes DIR/samples.npz (`arr_0`: uint8 N x H x W x 3 as the official FID dump, `labels`: N; with
guidance), DIR/samples_unguided.npz, DIR/samples.png and DIR/samples_unguided.png (one row per class),
DIR/loss.png, DIR/summary.json and the training run in DIR/run/ (checkpoints, metrics.jsonl, log.txt).

Needs the [demo] extra (scikit-learn for the digits, Pillow for the PNGs, matplotlib for the loss
plot), checked before anything runs.
"""
import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ._extras import MissingDependency, require
from .data import DIGITS_NUM_CLASSES as NUM_CLASSES
from .eval import digits as D
from .train.args import OneLineArgumentParser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=prog or "python -m dit_fast.demo",
                              description="Train a small DiT on the bundled 8x8 digits (CPU, a few minutes), "
                                          "sample every class, and score the samples.")
    p.add_argument("--out", default="dit-fast-demo", help="output directory")
    p.add_argument("--image-size", type=int, choices=(16, 32), default=16)
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3,
                   help="AdamW learning rate (the ImageNet recipe's 1e-4 is far too slow for a 1,500-step run)")
    p.add_argument("--ema-decay", type=float, default=0.995,
                   help="EMA decay (the ImageNet recipe's 0.9999 needs runs of 100k+ steps)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8,
                   help="8: a 16x16 digit is 2x2 tokens, each a 4x4 block of the original 8x8 digit (4: 16 "
                        "tokens, about 3x slower per step on a CPU)")
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sampling-steps", type=int, default=25, help="respaced ancestral sampling steps")
    p.add_argument("--cfg-scale", type=float, default=2.5, help="classifier-free guidance scale")
    p.add_argument("--classifier-epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores not already busy, judged by the load average; "
                        "threads competing with other processes for cores slow training down several times)")
    return p


def validate(args: argparse.Namespace) -> None:
    for name in ("lr", "ema_decay", "cfg_scale"):
        if not math.isfinite(getattr(args, name)):  # NaN passes every comparison below
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for name in ("steps", "batch_size", "hidden_size", "depth", "num_heads", "patch_size", "samples_per_class",
                 "sampling_steps", "classifier_epochs", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.samples_per_class < 2:
        raise ValueError(f"--samples-per-class must be >= 2 (a Fréchet distance needs a covariance), "
                         f"got {args.samples_per_class}")
    if args.cfg_scale < 1.0:
        raise ValueError(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    if args.sampling_steps > 1000:
        raise ValueError(f"--sampling-steps must be <= 1000 (the diffusion's length), got {args.sampling_steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def auto_threads() -> int:
    """torch's thread count, less the cores other processes keep busy (1-minute load average)."""
    import os

    default = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return default
    cores = os.cpu_count() or default
    return max(1, min(default, int(cores - busy + 0.5)))


class _Phase:
    """Prints 'name ... done in Xs' around a step of the demo."""

    def __init__(self, name: str, timings: Dict[str, float]):
        self.name, self.timings = name, timings

    def __enter__(self):
        print(f"==> {self.name}", flush=True)
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.time() - self.t0
        if exc[0] is None:
            print(f"    done in {self.timings[self.name]:.1f}s", flush=True)


@torch.no_grad()
def sample_digits(model, labels: torch.Tensor, noise: torch.Tensor, sampling_steps: int,
                  cfg_scale: float, batch_size: int = 250, progress: bool = False,
                  noise_schedule: str = "linear") -> torch.Tensor:
    """Ancestral sampling (respaced to `sampling_steps`) of `labels` from `noise`; cfg_scale > 1
    applies classifier-free guidance to every channel. Returns (N, C, S, S) in [-1, 1]."""
    from .diffusion import create_diffusion

    diffusion = create_diffusion(str(sampling_steps), noise_schedule=noise_schedule)
    out = []
    for i in range(0, len(labels), batch_size):
        y, z = labels[i:i + batch_size], noise[i:i + batch_size]
        if cfg_scale > 1.0:
            z2 = torch.cat([z, z])
            y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
            fn = partial(model.forward_with_cfg, guide_channels="all")
            s = diffusion.p_sample_loop(fn, z2.shape, z2, clip_denoised=True,
                                        model_kwargs=dict(y=y2, cfg_scale=cfg_scale), progress=progress)
            s = s[:len(y)]
        else:
            s = diffusion.p_sample_loop(model.forward, z.shape, z, clip_denoised=True,
                                        model_kwargs=dict(y=y), progress=progress)
        out.append(s.clamp(-1, 1))
    return torch.cat(out)


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_row: int = 10, zoom: int = 4) -> None:
    """PNG with one row per class (the first `per_row` samples of each), pixels enlarged `zoom` times."""
    from PIL import Image

    classes = sorted(set(int(c) for c in labels))
    h, w = images.shape[1:3]
    pad = 2
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    canvas = np.full((len(classes) * cell_h + pad, per_row * cell_w + pad, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:per_row]
        for k, i in enumerate(idx):
            big = images[i].repeat(zoom, axis=0).repeat(zoom, axis=1)
            y0, x0 = pad + r * cell_h, pad + k * cell_w
            canvas[y0:y0 + h * zoom, x0:x0 + w * zoom] = big
    Image.fromarray(canvas).save(path)


def plot_loss(metrics, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([m["step"] for m in metrics])
    loss = np.array([m["loss"] for m in metrics])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss (per log interval)")
    if len(loss) >= 8:
        k = max(2, len(loss) // 15)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE + VB)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("DiT on 8x8 digits: training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """The whole demo; returns the summary written to OUT/summary.json."""
    validate(args)
    try:
        require(["sklearn", "PIL", "matplotlib"], "demo", "the demo")
    except MissingDependency as e:
        raise ValueError(str(e)) from None
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    out = Path(args.out)
    run_dir = out / "run"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ValueError(f"--out {str(out)!r} already holds a demo run; choose another directory or delete it")
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    t_start = time.time()
    progress = sys.stderr.isatty()

    print(f"dit-fast demo: {threads} CPU thread(s), output in {out}", flush=True)
    with _Phase("1/4 training the digits classifier (the judge)", timings):
        clf = D.train_classifier(args.image_size, epochs=args.classifier_epochs, seed=args.seed)
        real_stats = D.real_feature_stats(clf)
        print(f"    held-out accuracy on real digits: {clf.val_accuracy:.1%} ({clf.num_val} images)")

    with _Phase(f"2/4 training a DiT on the digits ({args.steps} steps, batch {args.batch_size})", timings):
        from .train import make_args, read_metrics, train

        targs = make_args(
            dataset="digits", image_size=args.image_size, model="DiT-S/2", depth=args.depth,
            hidden_size=args.hidden_size, num_heads=args.num_heads, patch_size=args.patch_size,
            global_batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, ema_decay=args.ema_decay,
            global_seed=args.seed, results_dir=str(run_dir), log_every=args.log_every,
            ckpt_every=args.steps, num_workers=0, device="cpu", progress=progress)
        summary_train = train(targs)
        ckpt = summary_train["last_checkpoint"]

    from .checkpoint import from_pretrained

    model = from_pretrained(ckpt, key="ema")
    n = args.samples_per_class
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n)
    gen = torch.Generator().manual_seed(args.seed + 12345)
    noise = torch.randn(len(labels), model.in_channels, args.image_size, args.image_size, generator=gen)
    results = {}
    for key, scale, title in (("guided", args.cfg_scale, f"3/4 sampling {len(labels)} digits with guidance "
                               f"(scale {args.cfg_scale}, {args.sampling_steps} steps)"),
                              ("unguided", 1.0, f"4/4 sampling {len(labels)} digits without guidance")):
        with _Phase(title, timings):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed + (1 if key == "guided" else 2))
                x = sample_digits(model, labels, noise, args.sampling_steps, scale, progress=progress)
            arr = D.to_uint8(x)
            suffix = "" if key == "guided" else "_unguided"
            np.savez(out / f"samples{suffix}.npz", arr_0=arr, labels=labels.numpy())
            save_grid(arr, labels.numpy(), out / f"samples{suffix}.png")
            results[key] = D.evaluate_samples(clf, arr, labels, real_stats)
            results[key]["cfg_scale"] = scale

    metrics = read_metrics(run_dir)
    plot_loss(metrics, out / "loss.png")
    total = time.time() - t_start
    summary = {
        "classifier_val_accuracy": clf.val_accuracy,
        "guided": results["guided"],
        "unguided": results["unguided"],
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "checkpoint": ckpt,
        "timings_sec": timings,
        "total_sec": total,
        "settings": {k: v for k, v in vars(args).items()},
        "model": {k: v for k, v in model.config.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": threads,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path) -> None:
    g, u = s["guided"], s["unguided"]
    bar = "-" * 64
    print(bar)
    print(f"DiT on 8x8 digits ({s['parameters']:,} parameters, {s['settings']['steps']} steps): done in "
          f"{s['total_sec'] / 60:.1f} min")
    print(f"  judge: a CNN with {s['classifier_val_accuracy']:.1%} accuracy on held-out real digits")
    print(f"  {'':28s}{'recognised as their class':>27s}{'Fréchet dist.':>15s}")
    print(f"  {'with guidance (scale ' + format(g['cfg_scale'], 'g') + ')':28s}{g['accuracy']:>27.1%}"
          f"{g['frechet_distance']:>15.2f}")
    print(f"  {'without guidance':28s}{u['accuracy']:>27.1%}{u['frechet_distance']:>15.2f}")
    print(f"  (Fréchet distance between real and generated digits in the judge's 128-d feature space)")
    print(f"  samples:   {out / 'samples.png'}  (one row per class; unguided: samples_unguided.png)")
    print(f"  FID dump:  {out / 'samples.npz'}  (arr_0 uint8 NxHxWx3, labels)")
    print(f"  loss plot: {out / 'loss.png'};  checkpoint: {s['checkpoint']}")
    print(bar)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
