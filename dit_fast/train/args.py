"""Command-line arguments of `python -m dit_fast.train` / `dit-fast train`.

The official train.py flags keep their names and defaults (--data-path, --results-dir, --model,
--image-size, --num-classes, --epochs, --global-batch-size, --global-seed, --vae, --num-workers,
--log-every, --ckpt-every); the rest are additions.
"""
import argparse
import math
import os
import sys
from typing import Optional, Sequence, Set, Tuple

from ..data import DIGITS_SIZES
from ..models.dit import BLOCK_TYPES, DiT_models

DATASETS = ("auto", "imagefolder", "latents", "digits")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (`prog: error: ...`), exit status 2."""

    def error(self, message):
        # under torchrun every process parses the same arguments: one of them reports
        rank0 = os.environ.get("RANK", "0") in ("", "0")
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if rank0 else None)


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = p.add_argument_group("data")
    d.add_argument("--data-path", type=str, default=None,
                   help="ImageFolder root (root/<class>/<images>) or a directory written by "
                        "`python -m dit_fast.extract_latents`")
    d.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto: latents when DATA_PATH holds extracted latents, else an ImageFolder; "
                        "digits: scikit-learn's bundled 8x8 digits in pixel space (no data path, no VAE)")
    d.add_argument("--image-size", type=int, default=None,
                   help="image resolution (default 256; 16 for --dataset digits, which takes 8, 16 or 32)")
    d.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: read from the data; 1 = unconditional, no label dropout)")
    d.add_argument("--num-workers", type=int, default=4)
    d.add_argument("--vae", type=str, default="ema",
                   help="'ema' / 'mse' (stabilityai/sd-vae-ft-*), a diffusers hub id, or a local "
                        "AutoencoderKL directory; unused with latents or digits")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="ImageFolder data: replace an unreadable image by the next readable one (counted in the "
                        "log and metrics.jsonl) instead of stopping")

    m = p.add_argument_group("model")
    m.add_argument("--model", type=str, default="DiT-XL/2", help="a DiT_models name, e.g. DiT-S/2")
    m.add_argument("--depth", type=int, default=None, help="override the named model's depth")
    m.add_argument("--hidden-size", type=int, default=None, help="override the named model's width")
    m.add_argument("--num-heads", type=int, default=None, help="override the named model's heads")
    m.add_argument("--patch-size", type=int, default=None, help="override the named model's patch size")
    m.add_argument("--mlp-ratio", type=float, default=None, help="override the MLP ratio (4.0)")
    m.add_argument("--block", choices=BLOCK_TYPES, default=None, help="conditioning block (adaLN-Zero)")
    m.add_argument("--class-dropout-prob", type=float, default=None,
                   help="label dropout for classifier-free guidance (0.1; 0 when --num-classes 1)")

    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, default=1400)
    o.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    o.add_argument("--global-batch-size", type=int, default=256, help="summed over all processes")
    o.add_argument("--global-seed", "--seed", dest="global_seed", type=int, default=0)
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--ema-decay", type=float, default=0.9999)
    o.add_argument("--noise-schedule", choices=("linear", "squaredcos_cap_v2"), default="linear",
                   help="beta schedule of the 1000-step diffusion (official: linear)")
    o.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the model's forward and backward to bfloat16")
    o.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory)")
    o.add_argument("--no-tf32", dest="tf32", action="store_false", help="disable TF32 matmuls on GPUs")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    r = p.add_argument_group("output")
    r.add_argument("--results-dir", type=str, default="results",
                   help="run directory: checkpoints/NNNNNNN.pt, metrics.jsonl, log.txt")
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument("--ckpt-every", type=int, default=50_000)
    r.add_argument("--keep-last", type=int, default=0, help="keep only the K newest checkpoints (0: all)")
    r.add_argument("--resume", type=str, default=None,
                   help="a checkpoint file, or a run directory (its newest checkpoint)")
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar even on a terminal")
    return p


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog=prog or "python -m dit_fast.train",
        description="Train a DiT (official recipe: AdamW 1e-4, EMA 0.9999). Launch with "
                    "`torchrun --nproc_per_node N -m dit_fast.train ...` for data-parallel training.")
    return add_train_arguments(p)


def explicit_keys(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """Destinations of the options given on the command line (not left at their defaults)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return set(vars(ns))


def validate(args: argparse.Namespace, custom_dataset: bool = False) -> None:
    """Checks that need no data or model; raise ValueError naming the argument."""
    for name in ("lr", "weight_decay", "ema_decay", "class_dropout_prob", "mlp_ratio"):
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):  # NaN passes every comparison below
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("epochs", "global_batch_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.mlp_ratio is not None and args.mlp_ratio <= 0:
        raise ValueError(f"--mlp-ratio must be positive, got {args.mlp_ratio}")
    if args.keep_last < 0:
        raise ValueError(f"--keep-last must be >= 0, got {args.keep_last}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ValueError(f"--num-classes must be >= 1, got {args.num_classes}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.class_dropout_prob is not None and not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class-dropout-prob must be in [0, 1), got {args.class_dropout_prob}")
    if args.model not in DiT_models:
        raise ValueError(f"--model: unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be positive, got {args.image_size}")
    if args.dataset == "digits":
        if args.image_size is not None and args.image_size not in DIGITS_SIZES:
            raise ValueError(f"--image-size must be 8, 16 or 32 with --dataset digits, got {args.image_size}")
    elif args.data_path is None and args.resume is None and not custom_dataset:
        raise ValueError("--data-path is required (an ImageFolder root or extracted latents), "
                         "unless --dataset digits")


def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None
               ) -> Tuple[argparse.Namespace, Set[str]]:
    """Parse and validate; a bad argument exits with one error line (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        parser.error(str(e))
    return args, explicit_keys(parser, argv)


def defaults() -> argparse.Namespace:
    """Every training argument at its default (for the Python API)."""
    return build_parser().parse_args([])


def make_args(**overrides) -> argparse.Namespace:
    """Training arguments for the Python API: defaults updated with `overrides` (attribute names)."""
    args = defaults()
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise ValueError(f"unknown training argument {k!r}")
        setattr(args, k, v)
    return args
