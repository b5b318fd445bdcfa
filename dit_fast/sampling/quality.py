"""Sample quality per sampler and step-cache setting on the digits demo:
`python -m dit_fast.sampling.quality --ckpt RUN/checkpoints/NNNNNNN.pt`.

For a class-conditional pixel-space DiT trained on scikit-learn's digits (`python -m dit_fast.train
--dataset digits ...` or the demo), every configuration samples the same N labels (balanced over the
10 classes) from the same starting noise, and is scored with the digits classifier
(dit_fast.eval.digits): accuracy (the sample is recognised as its conditioning class) and the Fréchet
distance between classifier features of the samples and of all real digits. Also reported: model
evaluations, wall time, and for step caching the fraction of calls that reused the deep blocks.
A row "real digits" gives the metric's floor: N real digits against all of them.

Default configurations: DDPM-250 (the official sampler), DDIM-50, DPM-Solver++ with 10 and 20
steps (both time grids), its SDE variant with 10 and 20 steps, DDIM-10/20 (the same budgets), and step caching on DDPM-250 and DDIM-50 at
a few thresholds. On a loaded CPU run it single-threaded (OMP_NUM_THREADS=1): oversubscribed
OpenMP threads slow PyTorch down several times.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..checkpoint import from_pretrained
from .loops import LoopRunner, make_sampler
from .step_cache import StepCache

DEFAULT_CONFIGS = [
    "ddpm:250", "ddim:50", "dpm-solver++:10", "dpm-solver++:20", "dpm-solver++:10:logSNR",
    "dpm-solver++:20:logSNR", "sde-dpm-solver++:10", "sde-dpm-solver++:20", "ddim:10", "ddim:20",
    # DDPM re-noises every step (probe change ~0.1-0.2 per step), DDIM is smooth (~0.01): other scales
    "ddpm:250:cache=0.15", "ddpm:250:cache=0.3", "ddpm:250:cache=0.5",
    "ddim:50:cache=0.02", "ddim:50:cache=0.05", "ddim:50:cache=0.1",
]


def parse_config(spec: str) -> Dict[str, Any]:
    """'sampler:steps[:skip_type][:cache=THRESH]' -> dict."""
    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError(f"config {spec!r}: expected sampler:steps[:skip_type][:cache=THRESH]")
    cfg: Dict[str, Any] = dict(sampler=parts[0], steps=int(parts[1]), skip_type="time_uniform", cache=0.0)
    for extra in parts[2:]:
        if extra.startswith("cache="):
            cfg["cache"] = float(extra[len("cache="):])
        else:
            cfg["skip_type"] = extra
    return cfg


def run_config(model, cfg: Dict[str, Any], noise: torch.Tensor, labels: torch.Tensor, cfg_scale: float,
               batch_size: int) -> Dict[str, Any]:
    """Samples (N, C, H, W) in [-1, 1] for one configuration, with timing and cache statistics."""
    sampler = make_sampler(cfg["sampler"], cfg["steps"], skip_type=cfg["skip_type"])
    net = StepCache(model, threshold=cfg["cache"]) if cfg["cache"] > 0 else model
    use_cfg = cfg_scale != 1.0
    fn = net.forward_with_cfg if use_cfg else net.forward
    runner = LoopRunner(fn, sampler, clip_denoised=True)
    out = []
    torch.manual_seed(1234)                      # the same per-step noise stream for every configuration
    t0 = time.perf_counter()
    for i in range(0, len(noise), batch_size):
        z, y = noise[i:i + batch_size], labels[i:i + batch_size]
        if use_cfg:
            z = torch.cat([z, z])
            y = torch.cat([y, torch.full_like(y, model.num_classes)])
            kw: Dict[str, Any] = dict(y=y, cfg_scale=cfg_scale, guide_channels="all")
        else:
            kw = dict(y=y)
        s = runner(z, kw)
        out.append(s.chunk(2)[0] if use_cfg else s)
    seconds = time.perf_counter() - t0
    res = dict(seconds=seconds, model_evals=cfg["steps"])
    if isinstance(net, StepCache):
        res["reuse_fraction"] = net.reuse_fraction
        res["deep_blocks_skipped"] = net.reuse_fraction * net.deep_fraction
    return dict(samples=torch.cat(out), **res)


def evaluate(ckpt: str, configs: Sequence[str], num_samples: int = 500, batch_size: int = 250,
             cfg_scale: float = 1.0, seed: int = 0, key: str = "ema", log=print) -> Dict[str, Any]:
    from ..eval.digits import train_classifier

    model = from_pretrained(ckpt, key=key).eval()
    size = model.input_size
    t0 = time.perf_counter()
    with torch.enable_grad():
        clf = train_classifier(image_size=size, seed=seed)
    with torch.no_grad():
        return _evaluate(model, clf, configs, num_samples, batch_size, cfg_scale, seed, ckpt, t0, log)


def _evaluate(model, clf, configs, num_samples, batch_size, cfg_scale, seed, ckpt, t0, log) -> Dict[str, Any]:
    from ..eval.digits import evaluate_samples, load_digits_images, real_feature_stats, to_uint8

    size = model.input_size
    real_stats = real_feature_stats(clf)
    log(f"classifier: val accuracy {clf.val_accuracy:.4f} ({time.perf_counter() - t0:.0f}s)")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % model.num_classes
    noise = torch.randn(num_samples, model.in_channels, size, size, generator=g)

    rows: List[Dict[str, Any]] = []
    real, real_labels = load_digits_images(size)
    idx = torch.randperm(len(real), generator=g)[:num_samples]
    floor = evaluate_samples(clf, to_uint8(real[idx]), real_labels[idx], real_stats)
    rows.append(dict(config="real digits", accuracy=floor["accuracy"], frechet_distance=floor["frechet_distance"]))
    log(f"{'real digits':28s} acc {floor['accuracy']:.4f}  FD {floor['frechet_distance']:.3f}")
    for spec in configs:
        cfg = parse_config(spec)
        res = run_config(model, cfg, noise, labels, cfg_scale, batch_size)
        scores = evaluate_samples(clf, to_uint8(res.pop("samples")), labels, real_stats)
        row = dict(config=spec, accuracy=scores["accuracy"], frechet_distance=scores["frechet_distance"], **res)
        rows.append(row)
        extra = (f"  reuse {row['reuse_fraction']:.2f}" if "reuse_fraction" in row else "")
        log(f"{spec:28s} acc {row['accuracy']:.4f}  FD {row['frechet_distance']:.3f}  "
            f"{row['seconds']:.1f}s{extra}")
    return dict(ckpt=ckpt, num_samples=num_samples, cfg_scale=cfg_scale, seed=seed, model_config=model.config,
                classifier_val_accuracy=clf.val_accuracy, torch_threads=torch.get_num_threads(), rows=rows)


def markdown(report: Dict[str, Any]) -> str:
    lines = ["| configuration | NFE | accuracy | Fréchet distance | seconds | cache reuse |",
             "|---|---:|---:|---:|---:|---:|"]
    def fmt(r, key, spec):  # blank where a column does not apply (real digits, no cache)
        return format(r[key], spec) if key in r else ""

    for r in report["rows"]:
        lines.append(f"| {r['config']} | {fmt(r, 'model_evals', 'd')} | {r['accuracy']:.4f} | "
                     f"{r['frechet_distance']:.3f} | {fmt(r, 'seconds', '.1f')} | "
                     f"{fmt(r, 'reuse_fraction', '.2f')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_fast.sampling.quality", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a digits DiT checkpoint")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="sampler:steps[:skip_type][:cache=THRESH] ... (default: the list in the module docstring)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", choices=("ema", "model"), default="ema")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    try:
        for spec in args.configs:
            parse_config(spec)
    except ValueError as e:
        print(f"dit_fast.sampling.quality: error: --configs: {e}", file=sys.stderr)
        return 2
    report = evaluate(args.ckpt, args.configs, args.num_samples, args.batch_size, args.cfg_scale, args.seed,
                      args.key, log=lambda s: print(s, flush=True))
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
