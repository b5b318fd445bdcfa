"""The training loop: the official DiT recipe, data-parallel, with exact resume.

Official behaviour kept: AdamW (lr 1e-4, no weight decay, constant), EMA 0.9999 initialised to the
model, global batch split evenly over ranks, DistributedSampler seeded with the global seed, per-rank
seed global_seed * world_size + rank, uniform timesteps, `diffusion.training_losses(...)["loss"].mean()`,
checkpoints {model, ema, opt, args}.
Added: pre-extracted latents and pixel-space data, bf16 autocast, gradient checkpointing, metrics
all-reduced over ranks, atomic rotating checkpoints, bit-exact resume (model, EMA, optimizer, step,
per-rank RNG states and data position), a stop with a clear message on a non-finite loss,
--skip-bad-images for ImageFolder data.

The loop reads nothing back from the device between sync points (log steps, checkpoint steps and the
last step): losses are summed on the device, with the step of the first non-finite loss; at a sync
point a non-finite loss stops training before that step's update, naming the step where it first
appeared, and no weights updated after it are ever saved.
"""
import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Set

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .._extras import MissingDependency, require
from ..checkpoint import state_dict_mismatch
from ..models.dit import DiT, DiT_configs, DiT_models, _check_config
from . import distributed as dist_utils
from . import state as ckpt_state
from .args import validate
from .data import (BadImageError, DigitsDataset, ImageFolder, LatentDataset, TrainSampler, is_latents_dir, keyed,
                   label_count, split_batch)
from .ema import make_ema, update_ema

LOGGER_NAME = "dit_fast.train"
METRICS_FILE = "metrics.jsonl"
# Changing these on --resume gives a run that is no longer the continuation of the original one.
_ORDER_ARGS = ("global_seed", "global_batch_size", "data_path", "dataset", "image_size")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


# --------------------------------------------------------------------------- helpers

def build_model_config(args: argparse.Namespace, input_size: int, in_channels: int) -> Dict[str, Any]:
    """DiT(...) keyword arguments from --model and the explicit overrides."""
    if args.model not in DiT_models:
        raise ValueError(f"--model: unknown model {args.model!r}; choose one of {', '.join(DiT_models)}")
    cfg = dict(DiT_configs[args.model], mlp_ratio=4.0, block="adaLN-Zero")
    for key in ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "block"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg.update(input_size=input_size, in_channels=in_channels, num_classes=args.num_classes,
               class_dropout_prob=args.class_dropout_prob, learn_sigma=True)
    try:
        _check_config(**{k: v for k, v in cfg.items() if k != "learn_sigma"})
    except ValueError as e:
        raise ValueError(f"model configuration ({args.model} with overrides): {e}") from None
    return cfg


def enable_grad_checkpointing(model: DiT) -> None:
    """Recompute every transformer block in the backward pass (activation memory ~ one block).
    The blocks' forward is wrapped on the instance: parameter names and state dicts are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        fwd = block.forward

        def wrapped(*inputs, _fwd=fwd, **kwargs):  # the fused forward passes mod=, h=, next_norm=
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *inputs, use_reentrant=False, **kwargs)
            return _fwd(*inputs, **kwargs)

        block.forward = wrapped


def _plain_args(args: argparse.Namespace) -> argparse.Namespace:
    """A Namespace of plain values only (weights_only-loadable)."""
    out = argparse.Namespace()
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            setattr(out, k, v)
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (bool, int, float, str)) for e in v):
            setattr(out, k, list(v))
    return out


def _setup_logger(results_dir: Optional[Path], is_main: bool, use_bar: bool) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.WARNING)
        return logger
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s" if sys.stdout.isatty()
                            else "[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if use_bar:
        handler: logging.Handler = _TqdmHandler()
    else:
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    if results_dir is not None:
        fh = logging.FileHandler(results_dir / "log.txt")
        fh.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
    return logger


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def read_metrics(results_dir) -> list:
    """The records of RESULTS/metrics.jsonl (a list of dicts, in step order)."""
    path = Path(results_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def _merge_resume_args(args: argparse.Namespace, saved: argparse.Namespace, explicit: Optional[Set[str]],
                       ckpt_path: Path, logger_msgs: list) -> argparse.Namespace:
    """The saved run's arguments, updated with the ones given now (all of them for the Python API)."""
    merged = argparse.Namespace(**vars(saved))
    if explicit is None:  # the Python API: the arguments set away from their defaults
        from .args import defaults

        base = vars(defaults())
        explicit = {k for k, v in vars(args).items() if k not in base or base[k] != v}
    for k, v in vars(args).items():
        if k in explicit or not hasattr(merged, k):
            setattr(merged, k, v)
    if "results_dir" not in explicit:
        merged.results_dir = str(ckpt_state.run_dir_of(ckpt_path))
    merged.resume = str(ckpt_path)
    changed = [k for k in _ORDER_ARGS if getattr(saved, k, None) != getattr(merged, k, None)
               and hasattr(saved, k)]
    if changed:
        logger_msgs.append("warning: --resume with changed " + ", ".join("--" + c.replace("_", "-") for c in changed)
                           + ": the data order will differ from the original run")
    return merged


# --------------------------------------------------------------------------- data

class _Data:
    def __init__(self, dataset, vae=None, scale: float = 1.0, in_channels: int = 3, input_size: int = 32):
        self.dataset, self.vae, self.scale = dataset, vae, scale
        self.in_channels, self.input_size = in_channels, input_size


def build_data(args: argparse.Namespace, device: torch.device, dataset=None) -> _Data:
    """Dataset + (optional) VAE + model input geometry; fills args.image_size / args.dataset."""
    if dataset is not None:  # a user dataset of model inputs (pixels or latents), (x, label) items
        ds = keyed(dataset)
        if len(ds) == 0:
            raise ValueError("dataset: the custom dataset is empty")
        x0 = ds[0][0]
        if not isinstance(x0, torch.Tensor) or x0.dim() != 3 or x0.shape[1] != x0.shape[2]:
            raise ValueError("dataset: items must be (x, label) with x a (C, S, S) tensor, got "
                             f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
        args.dataset = "custom"
        args.image_size = args.image_size or int(x0.shape[-1])
        return _Data(ds, None, 1.0, int(x0.shape[0]), int(x0.shape[-1]))

    kind = args.dataset
    if kind == "auto":
        if args.data_path is None:
            raise ValueError("--data-path is required (an ImageFolder root or extracted latents), unless --dataset digits")
        if not Path(args.data_path).exists():
            raise ValueError(f"--data-path {args.data_path!r} does not exist")
        kind = "latents" if is_latents_dir(args.data_path) else "imagefolder"
        args.dataset = kind
    if kind == "digits":
        size = args.image_size or 16
        if size not in (8, 16, 32):
            raise ValueError(f"--image-size must be 8, 16 or 32 with --dataset digits, got {size}")
        args.image_size = size
        try:
            require(["sklearn"], "demo", "--dataset digits")
        except MissingDependency as e:
            raise ValueError(str(e)) from None
        return _Data(DigitsDataset(size), None, 1.0, 1, size)
    if args.data_path is None:
        raise ValueError(f"--data-path is required with --dataset {kind}")
    if not Path(args.data_path).exists():
        raise ValueError(f"--data-path {args.data_path!r} does not exist")
    if kind == "latents":
        ds = LatentDataset(args.data_path)
        if args.image_size is not None and args.image_size != ds.image_size:
            raise ValueError(f"--image-size {args.image_size} differs from the latents' image size {ds.image_size}")
        args.image_size = ds.image_size
        c, h, w = ds.latent_shape
        return _Data(ds, None, 1.0, c, h)
    # ImageFolder, encoded on the fly
    from .vae import load_vae, vae_geometry, vae_scale

    args.image_size = args.image_size or 256
    ds = ImageFolder(args.data_path, args.image_size, skip_bad=bool(getattr(args, "skip_bad_images", False)))
    vae = load_vae(args.vae, device)
    channels, size = vae_geometry(vae, args.image_size)
    return _Data(ds, vae, vae_scale(vae), channels, size)


def _batches(loader, step_now):
    """The loader's batches; an unreadable image stops training with one line naming the file."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except BadImageError as e:
            raise TrainingError(f"{e}; training stopped at step {step_now() + 1}") from None
        yield batch


# --------------------------------------------------------------------------- training

def train(args: argparse.Namespace, dataset=None, explicit: Optional[Set[str]] = None) -> Dict[str, Any]:
    """Train a DiT as `python -m dit_fast.train` does (see `dit_fast.train.make_args` for arguments).

    dataset: optional map-style dataset of (x, label) model inputs (pixels or latents) used instead
        of --data-path; x is (C, S, S). Under torchrun every rank must pass the same dataset.
    explicit: names of the arguments given on the command line; with --resume, the others are
        taken from the checkpoint (None: the arguments that differ from their defaults).
    Returns a summary: final step, epoch, results directory, last checkpoint, last logged metrics.
    Raises ValueError for bad arguments and TrainingError when training cannot go on.
    """
    args = argparse.Namespace(**vars(args))
    notes: list = []
    # ---- resume: the saved run's arguments, updated with the ones given now
    resume = None
    if args.resume:
        ckpt_path = ckpt_state.resolve_resume(args.resume)
        resume = ckpt_state.load(ckpt_path)
        args = _merge_resume_args(args, resume["args"], explicit, ckpt_path, notes)
    validate(args, custom_dataset=dataset is not None)
    split_batch(args.global_batch_size, dist_utils.env_world_size())  # before joining the process group
    ctx = dist_utils.setup(getattr(args, "device", "auto"))
    try:
        return _run(args, ctx, dataset, resume, notes)
    finally:
        dist_utils.cleanup(ctx)


def _run(args, ctx: dist_utils.DistContext, dataset, resume: Optional[dict], notes: list) -> Dict[str, Any]:
    device = ctx.device
    local_batch = split_batch(args.global_batch_size, ctx.world_size)

    # ---- seeds (official: one per rank), TF32
    seed = args.global_seed * ctx.world_size + ctx.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    if device.type == "cuda":  # untested here (no GPU)
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)

    # ---- data, model geometry, classes
    data = build_data(args, device, dataset)
    data_classes = label_count(data.dataset)
    if args.num_classes is None:
        if data_classes is None:
            raise ValueError("--num-classes: cannot read the number of classes from this dataset; pass it")
        args.num_classes = data_classes
    if args.num_classes > 1 and data_classes is not None and data_classes > args.num_classes:
        raise ValueError(f"--num-classes {args.num_classes}: the data has {data_classes} classes")
    if args.num_classes == 1:
        args.class_dropout_prob = 0.0   # unconditional: every label is 0, no null class
    elif args.class_dropout_prob is None:
        args.class_dropout_prob = 0.1
    config = build_model_config(args, data.input_size, data.in_channels)

    # ---- results directory, logging
    results_dir = Path(args.results_dir)
    ckpt_dir = results_dir / ckpt_state.CKPT_DIR
    problem = None
    if ctx.is_main:  # rank 0 owns the directory; every rank learns its verdict (no rank left waiting)
        if resume is None and ckpt_state.list_checkpoints(ckpt_dir):
            problem = (f"--results-dir {str(results_dir)!r} already holds checkpoints; pass --resume "
                       f"{str(results_dir)!r} to continue that run, or choose another directory")
        else:
            try:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                ckpt_state.remove_stale_temporaries(ckpt_dir)
            except OSError as e:
                problem = f"--results-dir {str(results_dir)!r}: {e.strerror or e}"
    problem = dist_utils.broadcast_object(problem, ctx)
    if problem:
        raise ValueError(problem)
    use_bar = bool(getattr(args, "progress", True)) and ctx.is_main and sys.stderr.isatty()
    logger = _setup_logger(results_dir if ctx.is_main else None, ctx.is_main, use_bar)
    for note in notes:
        logger.warning(note)
    logger.info(f"Experiment directory: {results_dir}" + (" (resuming)" if resume is not None else ""))

    # ---- model, EMA, optimizer (official order and settings)
    model = DiT(**config)
    ema = make_ema(model)            # before grad checkpointing wraps the training model's blocks
    if args.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.to(device)
    ema.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if resume is not None:
        problem = state_dict_mismatch(model, resume["model"])
        if problem:
            raise ValueError(f"--resume {args.resume!r}: the checkpoint does not match this model configuration "
                             f"(depth {config['depth']}, width {config['hidden_size']}, patch "
                             f"{config['patch_size']}): {problem}")
        try:
            model.load_state_dict(resume["model"], strict=True)
            ema.load_state_dict(resume["ema"], strict=True)
            opt.load_state_dict(resume["opt"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--resume {args.resume!r}: the checkpoint does not match this model "
                             f"configuration: {' '.join(str(e).split())}") from None
        for group in opt.param_groups:   # the arguments of this run win over the saved hyperparameters
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        step = int(resume["step"])
    else:
        update_ema(ema, model, decay=0)  # ensure EMA is initialized with synced weights
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"DiT Parameters: {n_params:,} ({config['depth']} blocks, width {config['hidden_size']}, "
                f"patch {config['patch_size']}, input {config['in_channels']}x{config['input_size']}^2)")

    train_model: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    from ..diffusion import create_diffusion

    # official: 1000 steps, linear noise schedule
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=getattr(args, "noise_schedule", "linear"))

    # ---- data order
    sampler = TrainSampler(data.dataset, ctx.world_size, ctx.rank, args.global_seed, local_batch)
    spe = sampler.steps_per_epoch
    if spe == 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size}: the dataset ({len(data.dataset)} samples) "
                         f"gives no full batch of {local_batch} per process")
    loader = DataLoader(data.dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed),
                        persistent_workers=False)
    logger.info(f"Dataset contains {len(data.dataset):,} samples ({args.dataset}), {spe:,} steps per epoch, "
                f"batch {local_batch} x {ctx.world_size} process(es)")
    limit = args.epochs * spe
    if args.max_steps is not None:
        limit = min(limit, args.max_steps)

    # ---- restore RNG states last: nothing may draw from them between here and the first step
    if resume is not None:
        rng = resume.get("rng") or []
        if len(rng) == ctx.world_size:
            ckpt_state.set_rng_state(rng[ctx.rank], device)
        else:
            logger.warning(f"warning: the checkpoint holds RNG states for {len(rng)} process(es), this run has "
                           f"{ctx.world_size}: random streams are reseeded (the run continues, not bit-exactly)")
            torch.manual_seed(seed + 1_000_003 * step)
        if resume.get("steps_per_epoch") not in (None, spe):
            logger.warning(f"warning: {spe} steps per epoch now, {resume.get('steps_per_epoch')} in the checkpoint; "
                           f"the data order differs from the original run")
        logger.info(f"Resumed from {args.resume} at step {step}")

    metrics_path = results_dir / METRICS_FILE
    if ctx.is_main:
        if resume is not None:
            _truncate_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)

    bf16 = args.precision == "bf16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():  # untested here (no GPU)
        raise ValueError("--precision bf16: this GPU does not support bfloat16")

    def model_fn(x, t, **kwargs):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = train_model(x, t, **kwargs)
        return out.float()

    train_model.train()
    ema.eval()
    summary: Dict[str, Any] = {"results_dir": str(results_dir), "start_step": step, "last_checkpoint": None,
                               "metrics": None}
    last_ckpt: Optional[Path] = Path(args.resume) if resume is not None else None

    def save(step_now: int, epoch_now: int) -> Path:
        rngs = dist_utils.all_gather_object(ckpt_state.rng_state(device), ctx)
        path = ckpt_state.checkpoint_path(results_dir, step_now)
        if ctx.is_main:
            checkpoint = {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "args": _plain_args(args),
                "config": dict(config),
                "step": step_now,
                "epoch": epoch_now,
                "steps_per_epoch": spe,
                "dataset_len": len(data.dataset),
                "world_size": ctx.world_size,
                "rng": rngs,
                "format": ckpt_state.FORMAT,
            }
            try:
                ckpt_state.atomic_save(checkpoint, path)
            except OSError as e:
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written"
                raise TrainingError(f"{e}; training stopped at step {step_now} ({where})") from None
            for old in ckpt_state.prune(ckpt_dir, args.keep_last):
                logger.info(f"Removed old checkpoint {old.name}")
            logger.info(f"Saved checkpoint to {path}")
        dist_utils.barrier(ctx)
        return path

    if step >= limit:
        logger.info(f"Nothing to do: step {step} >= the limit {limit} (--max-steps / --epochs)")
        summary.update(step=step, epoch=step // spe, last_checkpoint=str(last_ckpt) if last_ckpt else None)
        return summary

    bar = None
    if use_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=limit, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    logger.info(f"Training for {limit - step:,} steps (to step {limit:,}) ...")
    # device-side accumulators: loss / mse / vb summed over the window, this rank's loss, and the step
    # (with its loss) of the first non-finite loss since the last sync point (-1: none)
    window_sum = torch.zeros(3, dtype=torch.float64, device=device)
    local_sum = torch.zeros(1, dtype=torch.float64, device=device)
    step_t = torch.full((), step, dtype=torch.long, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps = 0
    skipped: list = []          # unreadable images replaced so far (--skip-bad-images)
    skipped_logged = 0
    t_start = time.time()
    window_start = time.time()
    epoch = step // spe
    start_batch = step % spe
    metrics_file = open(metrics_path, "a") if ctx.is_main else None
    try:
        while step < limit:
            sampler.set_epoch(epoch, start_batch)
            if start_batch == 0 and spe >= args.log_every:  # (short epochs would drown the loss lines)
                logger.info(f"Beginning epoch {epoch}...")
            for batch in _batches(loader, lambda: step):
                x, y = batch[0], batch[1]
                if len(batch) > 2:  # ImageFolder with --skip-bad-images: the files it could not read
                    skipped += [p for item in batch[2] if item for p in item.split(os.pathsep)]
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if data.vae is not None:
                    from .vae import encode

                    x = encode(data.vae, x, data.scale)
                if args.num_classes == 1:
                    y = torch.zeros_like(y)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
                loss_dict = diffusion.training_losses(model_fn, x, t, dict(y=y))
                loss = loss_dict["loss"].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                stats = torch.stack([loss.detach(),
                                     loss_dict["mse"].detach().mean() if "mse" in loss_dict else loss.detach(),
                                     loss_dict["vb"].detach().mean() if "vb" in loss_dict else torch.zeros_like(loss)
                                     ]).double()
                local_sum += stats[0]
                dist_utils.all_reduce_mean(stats, ctx)
                window_sum += stats
                step_t += 1
                new_bad = (first_bad < 0) & ~torch.isfinite(stats[0])
                first_bad = torch.where(new_bad, step_t, first_bad)
                bad_loss = torch.where(new_bad, stats[0], bad_loss)
                window_steps += 1
                if (step + 1) % args.log_every == 0 or (step + 1) % args.ckpt_every == 0 or step + 1 == limit:
                    bad_step = int(first_bad)  # the sync point: before this step's update
                    if bad_step >= 0:
                        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                        stop = ("before the update" if bad_step == step + 1 else
                                f"at step {step + 1} (losses are read at log and checkpoint steps), saving no "
                                f"weights updated since")
                        raise TrainingError(f"loss is {float(bad_loss)} at step {bad_step} (epoch "
                                            f"{(bad_step - 1) // spe}); training stopped {stop} ({where})")
                opt.step()
                update_ema(ema, model, decay=args.ema_decay)
                step += 1
                if bar is not None:
                    bar.update(1)

                if step % args.log_every == 0 or step == limit:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    now = time.time()
                    sps = window_steps / max(now - window_start, 1e-9)
                    avg = (window_sum / window_steps).tolist()
                    record = {"step": step, "epoch": epoch, "loss": avg[0], "mse": avg[1], "vb": avg[2],
                              "steps_per_sec": sps, "img_per_sec": sps * args.global_batch_size,
                              "lr": opt.param_groups[0]["lr"], "elapsed_sec": now - t_start}
                    if ctx.distributed:
                        per_rank = dist_utils.all_gather(local_sum, ctx).flatten() / window_steps
                        record["loss_per_rank"] = [float(v) for v in per_rank.cpu()]
                    if device.type == "cuda":  # untested here (no GPU)
                        record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                    if skipped:
                        record["skipped_images"] = len(skipped)
                    if ctx.is_main:
                        if len(skipped) > skipped_logged:
                            logger.warning(f"warning: skipped {len(skipped)} unreadable image(s) so far (replaced "
                                           f"by the next readable one; latest: {skipped[-1]})")
                            skipped_logged = len(skipped)
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        if bar is not None:
                            bar.set_postfix(loss=f"{avg[0]:.4f}", img_s=f"{record['img_per_sec']:.1f}")
                        else:
                            logger.info(f"(step={step:07d}) Train Loss: {avg[0]:.4f}, "
                                        f"Train Steps/Sec: {sps:.2f}, Img/Sec: {record['img_per_sec']:.1f}")
                    summary["metrics"] = record
                    window_sum.zero_()
                    local_sum.zero_()
                    window_steps = 0
                    window_start = time.time()

                if step % args.ckpt_every == 0 or step == limit:
                    last_ckpt = save(step, step // spe)
                if step >= limit:
                    break
            epoch += 1
            start_batch = 0
    except TrainingError as e:
        for h in logger.handlers:  # the console gets it once, from main()
            if isinstance(h, logging.FileHandler):
                h.emit(logging.LogRecord(LOGGER_NAME, logging.ERROR, __file__, 0, f"error: {e}", None, None))
        raise
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()

    model.eval()
    logger.info(f"Done! step {step}, {time.time() - t_start:.1f}s")
    summary.update(step=step, epoch=step // spe, last_checkpoint=str(last_ckpt) if last_ckpt else None)
    return summary


# --------------------------------------------------------------------------- CLI

def main(argv=None, prog: Optional[str] = None) -> int:
    """`python -m dit_fast.train`: returns the exit status (0 ok, 1 training failed, 2 bad arguments)."""
    from .args import parse_args

    args, explicit = parse_args(argv, prog)
    prog = prog or "python -m dit_fast.train"
    try:
        train(args, explicit=explicit)
    except ValueError as e:
        if dist_utils.env_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, OSError) as e:  # OSError: an output that cannot be written (a full disk)
        if dist_utils.env_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if dist_utils.env_rank() == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
