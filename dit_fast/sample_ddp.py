"""Sample many images for FID, sharded over processes: `torchrun --nproc_per_node=N -m dit_fast.sample_ddp`.

Drop-in for facebookresearch/DiT's `sample_ddp.py` (same flags and defaults: --model DiT-XL/2,
--vae ema, --sample-dir samples, --per-proc-batch-size 32, --num-fid-samples 50000,
--image-size 256, --num-classes 1000, --cfg-scale 1.5, --num-sampling-steps 250, --global-seed 0,
--tf32/--no-tf32, --ckpt; random labels; guidance only when cfg-scale > 1), plus the sampling flags
of `dit_fast.sample` (--sampler, --device, --dtype, --guide-channels, --step-cache, --cache, --compile,
--cuda-graph) and --out.

Work is split in shards of --per-proc-batch-size samples. Shard k holds the samples with global
indices [k*B, (k+1)*B) and is sampled by rank k mod world_size from its own seed (derived from
--global-seed and k), so its content does not depend on the number of processes. Each finished shard
is written atomically to `<sample-dir>/<run-name>/shard_<k>.npz`; a restarted job (with any number
of processes) skips the shards already there. At the end rank 0 writes one `.npz` (default
`<sample-dir>/<run-name>.npz`) with `arr_0` (uint8, N x H x W x 3: what the ADM evaluator reads) and
`labels` (int64, N), in global index order.

Without torchrun (no RANK/WORLD_SIZE in the environment) it runs as a single process. The process
group uses NCCL on GPUs and gloo on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .sampling.cache_cli import cache_settings
from .sample import (DTYPES, CLIError, OutputError, add_sampling_args, build_sampling, decode, has_null_class,
                     is_latent, load_model, load_vae, model_fn, resolve_device, to_uint8, validate_sampling_args)

PROG = "dit_fast.sample_ddp"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun ... -m dit_fast.sample_ddp", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=str, default=None, help="DiT-XL/2, ... (default: DiT-XL/2, or the checkpoint's)")
    p.add_argument("--vae", type=str, default=None,
                   help="mse | ema | local AutoencoderKL folder/file | hub id | none "
                        "(default: ema for latent models, as the official script; none for pixel-space ones)")
    p.add_argument("--sample-dir", type=str, default="samples")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--image-size", type=int, default=None, help="default: 256, or the checkpoint's")
    p.add_argument("--num-classes", type=int, default=None, help="default: 1000, or the checkpoint's")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="default: 250 (ddpm), 50 (ddim), 20 (dpm-solver++, sde-dpm-solver++)")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (faster; default on, as the official script)")
    p.add_argument("--ckpt", type=str, default=None,
                   help="a DiT checkpoint (.pt / .safetensors); default: a randomly initialized model")
    p.add_argument("--out", type=str, default=None, help="the .npz to write (default: <sample-dir>/<run-name>.npz)")
    add_sampling_args(p)
    return p.parse_args(argv)


def shard_seed(global_seed: int, shard: int) -> int:
    """Seed of shard `shard`: independent of the world size, distinct across shards and seeds."""
    return int(np.random.SeedSequence([global_seed, shard]).generate_state(1, dtype=np.uint64)[0] >> 1)


def run_name(args, model) -> str:
    """The official folder name, plus the sampler and its steps."""
    model_string = (args.model or _model_name(model)).replace("/", "-")
    ckpt_string = "pretrained"
    if args.ckpt:
        ckpt_string = os.path.basename(args.ckpt)
        for suffix in (".safetensors", ".pth", ".pt"):
            if ckpt_string.endswith(suffix):
                ckpt_string = ckpt_string[: -len(suffix)]
                break
    vae_string = os.path.basename(os.path.normpath(args.vae_resolved))
    size = args.image_size_resolved
    taylor = cache_settings(args)["cache"] == "taylor"
    return (f"{model_string}-{ckpt_string}-size-{size}-vae-{vae_string}-cfg-{args.cfg_scale}-seed-{args.global_seed}"
            f"-{args.sampler}-{args.steps}" + ("-cache-taylor" if taylor else ""))


def _model_name(model) -> str:
    from .models.dit import DiT_configs

    cfg = model.config
    for name, c in DiT_configs.items():
        if all(cfg[k] == v for k, v in c.items()):
            return name
    return f"DiT-d{cfg['depth']}-h{cfg['hidden_size']}-p{cfg['patch_size']}"


def _init_distributed(device_arg: Optional[str]):
    """(rank, world_size, device, distributed?)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    use_cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if use_cuda and (device_arg is None or device_arg == "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = resolve_device(device_arg)
    return rank, world, device, distributed


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard_{k:06d}.npz"


def _shard_ok(path: Path, n: int, image_shape) -> bool:
    try:
        with np.load(path) as f:
            return f["samples"].shape == (n, *image_shape) and f["labels"].shape == (n,)
    except Exception:  # missing, partial or corrupt: sample it again
        return False


def _write_npz_atomic(path: Path, **arrays) -> None:
    """A failed write (OutputError, e.g. a full disk) leaves no partial file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_folder(folder: Path, out: Path, meta: dict) -> None:
    """Create the shard folder; a folder from an earlier run must hold shards made with the same settings."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--sample-dir: cannot create {str(folder)!r}: {e.strerror}") from None
    meta = json.loads(json.dumps(meta))
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        changed = [k for k in meta if old.get(k) != meta[k]]
        if changed:
            raise CLIError(f"--sample-dir: {str(folder)!r} holds shards sampled with other settings "
                           f"({', '.join(changed)} differ); remove it or choose another --sample-dir")
    else:
        try:
            meta_path.write_text(json.dumps(meta, indent=1))
        except OSError as e:
            meta_path.unlink(missing_ok=True)
            raise OutputError(f"--sample-dir: cannot write {str(meta_path)!r}: {e.strerror or e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    distributed = False
    try:
        rank, world, device, distributed = _init_distributed(args.device)
        try:
            out = run(args, rank, world, device, distributed)
        finally:
            if distributed and dist.is_initialized():
                dist.destroy_process_group()
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    if out is not None:
        print(f"Saved .npz file to {out}")
    return 0


@torch.no_grad()
def run(args, rank: int, world: int, device: torch.device, distributed: bool) -> Optional[str]:
    from .sampling import LoopRunner

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    if args.per_proc_batch_size < 1:
        raise CLIError(f"--per-proc-batch-size must be positive, got {args.per_proc_batch_size}")
    if args.num_fid_samples < 1:
        raise CLIError(f"--num-fid-samples must be positive, got {args.num_fid_samples}")
    validate_sampling_args(args)
    if args.cfg_scale < 1.0:
        raise CLIError(f"--cfg-scale must be >= 1.0, got {args.cfg_scale}")
    torch.manual_seed(args.global_seed)   # a random model (no --ckpt) must be the same on every rank
    model = load_model(args.model, args.image_size, args.num_classes, args.ckpt, PROG if rank == 0 else None,
                       args.num_heads)
    using_cfg = args.cfg_scale > 1.0
    if using_cfg and not has_null_class(model):
        raise CLIError(f"--cfg-scale {args.cfg_scale}: the model has no null class (trained without label "
                       f"dropout); use --cfg-scale 1")
    net, sampler, mode, steps = build_sampling(args, model, device)
    args.steps = steps
    vae = load_vae(args.vae, model, device, default="ema")
    args.vae_resolved = args.vae or ("ema" if is_latent(model) else "none")
    latent = model.input_size
    args.image_size_resolved = latent * (8 if is_latent(model) else 1)
    image_shape = ((latent * 8, latent * 8, 3) if vae is not None else (latent, latent, 3))

    name = run_name(args, model)
    folder = Path(args.sample_dir) / name
    out = Path(args.out) if args.out else Path(args.sample_dir) / f"{name}.npz"
    if out.suffix != ".npz":
        raise CLIError(f"--out must name a .npz file, got {str(out)!r}")
    n = args.per_proc_batch_size
    cache = cache_settings(args)
    meta = dict(name=name, per_proc_batch_size=n, ckpt=args.ckpt, model_config=model.config,
                cfg_scale=args.cfg_scale, guide_channels=args.guide_channels, sampler=args.sampler, steps=steps,
                skip_type=args.skip_type, global_seed=args.global_seed, vae=args.vae_resolved,
                dtype=args.dtype, step_cache=args.step_cache, cache_shallow_blocks=args.cache_shallow_blocks,
                taylor_cache=cache if cache["cache"] == "taylor" else None)
    error = None
    if rank == 0:
        try:
            _prepare_folder(folder, out, meta)
        except CLIError as e:
            error = e
    if distributed:      # every rank stops on rank 0's error instead of waiting at a barrier
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error

    num_shards = math.ceil(args.num_fid_samples / n)
    mine = [k for k in range(rank, num_shards, world)]
    todo = [k for k in mine if not _shard_ok(_shard_path(folder, k), n, image_shape)]
    if rank == 0:
        print(f"{PROG}: {args.num_fid_samples} samples in {num_shards} shards of {n} over {world} process(es); "
              f"rank 0 has {len(todo)} of its {len(mine)} shards to sample", file=sys.stderr)
    runner = LoopRunner(model_fn(net, using_cfg, DTYPES[args.dtype]), sampler, mode=mode,
                        clip_denoised=not is_latent(model))
    it: Any = todo
    if rank == 0:
        from tqdm.auto import tqdm

        it = tqdm(todo)
    for k in it:
        torch.manual_seed(shard_seed(args.global_seed, k))
        z = torch.randn(n, model.in_channels, latent, latent, device=device)
        y = torch.randint(0, model.num_classes, (n,), device=device)
        if using_cfg:
            z = torch.cat([z, z], 0)
            y_in = torch.cat([y, torch.full((n,), model.num_classes, device=device, dtype=y.dtype)], 0)
            model_kwargs: Dict[str, Any] = dict(y=y_in, cfg_scale=args.cfg_scale, guide_channels=args.guide_channels)
        else:
            model_kwargs = dict(y=y)
        samples = runner(z, model_kwargs)
        if using_cfg:
            samples, _ = samples.chunk(2, dim=0)
        images = to_uint8(decode(samples, vae, model))
        _write_npz_atomic(_shard_path(folder, k), samples=images, labels=y.cpu().numpy().astype(np.int64))
    _barrier(distributed)

    if rank != 0:
        return None
    arrays, labels = [], []
    for k in range(num_shards):
        path = _shard_path(folder, k)
        if not _shard_ok(path, n, image_shape):
            raise CLIError(f"shard {path} is missing or unreadable after sampling")
        with np.load(path) as f:
            arrays.append(f["samples"])
            labels.append(f["labels"])
    arr = np.concatenate(arrays)[: args.num_fid_samples]
    lab = np.concatenate(labels)[: args.num_fid_samples]
    assert arr.shape == (args.num_fid_samples, *image_shape) and arr.dtype == np.uint8
    _write_npz_atomic(out, arr_0=arr, labels=lab)
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
