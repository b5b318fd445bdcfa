"""Pre-extract VAE latents of an ImageFolder tree, for training without the VAE in the loop.

    python -m dit_fast.extract_latents --data-path /data/imagenet/train --out /data/latents256
    torchrun --nproc_per_node 8 -m dit_fast.extract_latents --data-path ... --out ...
    python -m dit_fast.train --data-path /data/latents256 --model DiT-XL/2

Images get the official preprocessing (ADM center crop, [-1, 1]); for every image the latents of
the image *and of its horizontal flip* are stored, so training still flips at random each epoch
(fast-DiT freezes one flip per image). `--store sample` (default) keeps one scaled posterior sample
per view, as fast-DiT does; `--store moments` keeps the scaled posterior mean and standard deviation,
and training draws a fresh sample each time, exactly like on-the-fly encoding (twice the disk).

Output: DIR/meta.json and DIR/shard-rRRR-KKKKK.pt files, each {latents, labels, indices}, with
latents (N, 2, C, h, w) for `sample` or (N, 2, 2, C, h, w) (view, [mean, std]) for `moments`.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from .train import distributed as dist_utils
from .train.args import OneLineArgumentParser
from .train.data import LATENTS_FORMAT, LATENTS_META, ImageFolder
from .train.state import atomic_save
from .train.vae import encode, encode_moments, load_vae, vae_geometry, vae_scale

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=prog or "python -m dit_fast.extract_latents",
                              description="Encode an ImageFolder tree (image and horizontal flip) with the "
                                          "VAE into sharded latent files for `dit_fast.train`.")
    p.add_argument("--data-path", required=True, help="ImageFolder root: root/<class>/<images>")
    p.add_argument("--out", required=True, help="output directory (meta.json + shards)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default="ema", help="'ema' / 'mse', a diffusers hub id or a local AutoencoderKL dir")
    p.add_argument("--store", choices=("sample", "moments"), default="sample",
                   help="sample: one scaled posterior sample per view; moments: mean and std (resampled in training)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="storage dtype")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (per process)")
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples (--store sample)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing extraction in --out")
    return p


def extract(args: argparse.Namespace) -> dict:
    """Run the extraction (in every torchrun process); returns the meta dict written to DIR/meta.json."""
    for name in ("batch_size", "shard_size", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    out = Path(args.out)
    if (out / LATENTS_META).exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already holds extracted latents; pass --overwrite to replace them")
    if not Path(args.data_path).is_dir():
        raise ValueError(f"--data-path {args.data_path!r} is not a directory")
    ctx = dist_utils.setup(args.device)
    try:
        return _extract(args, ctx, out)
    finally:
        dist_utils.cleanup(ctx)


def _extract(args, ctx: dist_utils.DistContext, out: Path) -> dict:
    dataset = ImageFolder(args.data_path, args.image_size, flip=False)
    vae = load_vae(args.vae, ctx.device)
    channels, size = vae_geometry(vae, args.image_size)
    scale = vae_scale(vae)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed * ctx.world_size + ctx.rank)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / LATENTS_META).unlink(missing_ok=True)
        for old in out.glob("shard-r*.pt"):
            old.unlink()
    dist_utils.barrier(ctx)

    mine = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda")
    bar = None
    if ctx.is_main and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="img", desc=f"encoding (rank 0 of {ctx.world_size})")

    shards: List[dict] = []
    buf_lat: List[torch.Tensor] = []
    buf_lab: List[torch.Tensor] = []
    buf_idx: List[torch.Tensor] = []
    done = 0

    def flush(limit: int):
        """Write shards of `limit` images while the buffer holds that many (all of it if limit == 0)."""
        while buf_lat and (limit == 0 or sum(b.shape[0] for b in buf_lat) >= limit):
            lat, lab, idx = torch.cat(buf_lat), torch.cat(buf_lab), torch.cat(buf_idx)
            k = len(lab) if limit == 0 else limit
            name = f"shard-r{ctx.rank:03d}-{len(shards):05d}.pt"
            atomic_save({"latents": lat[:k].clone(), "labels": lab[:k].clone(), "indices": idx[:k].clone()},
                        out / name)
            shards.append({"file": name, "num": int(k)})
            buf_lat[:], buf_lab[:], buf_idx[:] = ([lat[k:]], [lab[k:]], [idx[k:]]) if k < len(lab) else ([], [], [])

    with torch.no_grad():
        for x, y in loader:
            n = x.shape[0]
            x = x.to(ctx.device, non_blocking=True)
            both = torch.cat([x, x.flip(-1)])              # the image and its horizontal flip
            if args.store == "sample":
                z = encode(vae, both, scale)                # (2n, C, h, w)
                lat = torch.stack([z[:n], z[n:]], dim=1)    # (n, 2, C, h, w)
            else:
                mean, std = encode_moments(vae, both, scale)
                lat = torch.stack([torch.stack([mean[:n], std[:n]], 1), torch.stack([mean[n:], std[n:]], 1)], 1)
            buf_lat.append(lat.to("cpu", dtype))
            buf_lab.append(torch.as_tensor(y, dtype=torch.int64))
            buf_idx.append(torch.as_tensor(mine[done:done + n], dtype=torch.int64))
            done += n
            if bar is not None:
                bar.update(n)
            flush(args.shard_size)
        flush(0)
    if bar is not None:
        bar.close()

    all_shards = [s for rank_shards in dist_utils.all_gather_object(shards, ctx) for s in rank_shards]
    meta = {
        "format": LATENTS_FORMAT,
        "source": str(Path(args.data_path).resolve()),
        "image_size": args.image_size,
        "vae": args.vae,
        "scale": scale,
        "store": args.store,
        "dtype": args.dtype,
        "latent_shape": [channels, size, size],
        "num_classes": dataset.num_classes,
        "classes": dataset.classes,
        "num_images": sum(s["num"] for s in all_shards),
        "shards": all_shards,
    }
    if ctx.is_main:
        tmp = out / (LATENTS_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / LATENTS_META)            # written last: its presence marks a complete extraction
        print(f"Wrote {meta['num_images']:,} images x 2 views ({args.store}, {channels}x{size}x{size}, "
              f"{args.dtype}) in {len(all_shards)} shard(s) to {out}")
    dist_utils.barrier(ctx)
    return meta


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        extract(args)
    except ValueError as e:
        if dist_utils.env_rank() == 0:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
