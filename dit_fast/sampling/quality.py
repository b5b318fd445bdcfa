"""Sample quality per sampler and step-cache setting on the digits demo:
`python -m dit_fast.sampling.quality --ckpt RUN/checkpoints/NNNNNNN.pt`.

For a class-conditional pixel-space DiT trained on scikit-learn's digits (`python -m dit_fast.train
--dataset digits ...` or the demo), every configuration samples the same N labels (balanced over the
10 classes) from the same starting noise, and is scored with the digits classifier
(dit_fast.eval.digits): accuracy (the sample is recognised as its conditioning class) and the Fréchet
distance between classifier features of the samples and of all real digits. Also reported: model
evaluations, wall time, and for step caching the fraction of calls that reused the deep blocks.
A row "real digits" gives the metric's floor: N real digits against all of them.

Forecasting cache (TaylorCache) configurations: `sampler:steps:taylor` (the per-sampler defaults
of dit_fast.sampling.cache_cli.TAYLOR_DEFAULTS) or `sampler:steps:taylor=i5,o2,f2,l0,final` (interval,
order, first and last steps always computed, features; any subset). Every row is compared with the
same sampler uncached (when in the list) and with DDPM-250: full model evaluations, forecast-only
steps, wall-time and Fréchet-distance ratios. `--out X.json` also writes X.png (the Pareto plot:
Fréchet distance against seconds, one point per configuration) and X.md (the markdown table).

The deeper digits model (12 blocks; caching behaves differently with depth) is the demo's recipe with
depth 12, one command, seed 0: `python -m dit_fast.demo --out runs/digits-d12 --depth 12` (1,500
steps; ~29 min on one thread of a loaded 2-core CPU); its checkpoint is
runs/digits-d12/run/checkpoints/0001500.pt.

Default configurations: DDPM-250 (the official sampler), DDIM-50, DPM-Solver++ with 10 and 20
steps (both time grids), its SDE variant with 10 and 20 steps, DDIM-10/20 (the same budgets), step
caching on DDPM-250 and DDIM-50 at a few thresholds, and the forecasting cache at its defaults and at
longer intervals. On a loaded CPU run it single-threaded (OMP_NUM_THREADS=1): oversubscribed OpenMP
threads slow PyTorch down several times.
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
from .cache_cli import TAYLOR_DEFAULTS
from .step_cache import StepCache
from .taylor_cache import FEATURES, TaylorCache

DEFAULT_CONFIGS = [
    "ddpm:250", "ddim:50", "dpm-solver++:10", "dpm-solver++:20", "dpm-solver++:10:logSNR",
    "dpm-solver++:20:logSNR", "sde-dpm-solver++:10", "sde-dpm-solver++:20", "ddim:10", "ddim:20",
    # DDPM re-noises every step (probe change ~0.1-0.2 per step), DDIM is smooth (~0.01): other scales
    "ddpm:250:cache=0.15", "ddpm:250:cache=0.3", "ddpm:250:cache=0.5",
    "ddim:50:cache=0.02", "ddim:50:cache=0.05", "ddim:50:cache=0.1",
    # the forecasting cache at its per-sampler defaults, and more aggressive intervals
    "ddpm:250:taylor", "ddpm:250:taylor=i10", "ddim:50:taylor", "ddim:50:taylor=i8", "dpm-solver++:20:taylor",
    "dpm-solver++:20:taylor=i5", "sde-dpm-solver++:20:taylor", "sde-dpm-solver++:20:taylor=i5",
]


_TAYLOR_KEYS = {"i": "interval", "o": "order", "f": "first_steps", "l": "last_steps"}


def parse_config(spec: str) -> Dict[str, Any]:
    """'sampler:steps[:skip_type][:cache=THRESH][:taylor[=i5,o2,f2,l0,final]]' -> dict."""
    parts = spec.split(":")
    usage = "expected sampler:steps[:skip_type][:cache=THRESH][:taylor[=i5,o2,f2,l0,output|final|blocks]]"
    if len(parts) < 2 or parts[0] not in TAYLOR_DEFAULTS or not parts[1].isdigit():
        raise ValueError(f"config {spec!r}: {usage}")
    cfg: Dict[str, Any] = dict(sampler=parts[0], steps=int(parts[1]), skip_type="time_uniform", cache=0.0,
                               taylor=None)
    for extra in parts[2:]:
        if extra.startswith("cache="):
            cfg["cache"] = float(extra[len("cache="):])
        elif extra == "taylor" or extra.startswith("taylor="):
            cfg["taylor"] = dict(TAYLOR_DEFAULTS[cfg["sampler"]])
            for item in filter(None, extra[len("taylor="):].split(",")):
                if item in FEATURES:
                    cfg["taylor"]["features"] = item
                elif item[:1] in _TAYLOR_KEYS and item[1:].isdigit():
                    cfg["taylor"][_TAYLOR_KEYS[item[0]]] = int(item[1:])
                else:
                    raise ValueError(f"config {spec!r}: bad taylor setting {item!r}; {usage}")
        else:
            cfg["skip_type"] = extra
    if cfg["cache"] > 0 and cfg["taylor"] is not None:
        raise ValueError(f"config {spec!r}: cache=THRESH and taylor exclude each other")
    return cfg


def base_spec(spec: str) -> str:
    """The uncached configuration of `spec` (same sampler, steps and time grid)."""
    return ":".join(p for p in spec.split(":") if not p.startswith(("cache=", "taylor")))


def run_config(model, cfg: Dict[str, Any], noise: torch.Tensor, labels: torch.Tensor, cfg_scale: float,
               batch_size: int) -> Dict[str, Any]:
    """Samples (N, C, H, W) in [-1, 1] for one configuration, with timing and cache statistics."""
    sampler = make_sampler(cfg["sampler"], cfg["steps"], skip_type=cfg["skip_type"])
    net = StepCache(model, threshold=cfg["cache"]) if cfg["cache"] > 0 else model
    if cfg["taylor"] is not None:
        net = TaylorCache(model, cfg["steps"], **cfg["taylor"])
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
    batches = (len(noise) + batch_size - 1) // batch_size
    res = dict(seconds=seconds, model_evals=cfg["steps"], forecast_steps=0)
    if isinstance(net, TaylorCache):                 # per sampling run (every batch runs the same schedule)
        res.update(model_evals=net.num_full // batches, forecast_steps=net.num_forecast // batches,
                   taylor=cfg["taylor"])
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
    from ..data import load_digits_images
    from ..eval.digits import evaluate_samples, real_feature_stats, to_uint8

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
    compare(rows)
    return dict(ckpt=ckpt, num_samples=num_samples, cfg_scale=cfg_scale, seed=seed, model_config=model.config,
                classifier_val_accuracy=clf.val_accuracy, torch_threads=torch.get_num_threads(), rows=rows,
                goals=goals(rows))


def compare(rows: List[Dict[str, Any]]) -> None:
    """Adds to each sampled row its ratios against the same sampler uncached (`vs_uncached`) and against
    DDPM-250 (`vs_ddpm250`), where those rows were run: evaluations saved (x), speedup (x), FD ratio,
    accuracy difference (points)."""
    by_spec = {r["config"]: r for r in rows}
    ref250 = by_spec.get("ddpm:250")
    for r in rows:
        if "seconds" not in r:
            continue
        for key, ref in (("vs_uncached", by_spec.get(base_spec(r["config"]))), ("vs_ddpm250", ref250)):
            if ref is not None and ref is not r:
                r[key] = dict(evals=ref["model_evals"] / r["model_evals"], speedup=ref["seconds"] / r["seconds"],
                              fd_ratio=r["frechet_distance"] / ref["frechet_distance"],
                              accuracy_points=100 * (r["accuracy"] - ref["accuracy"]))


def goals(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Issue 11's goals, where the rows needed were run: DDIM-50 and SDE-DPM-Solver++-20 with the
    taylor defaults vs uncached (>= 3x fewer evaluations, >= 2.5x less time, FD within +5%, accuracy
    within 1 point); the fastest configuration with FD <= DDPM-250's (>= 15x less time)."""
    out: Dict[str, Any] = {}
    by_spec = {r["config"]: r for r in rows}
    for spec in ("ddim:50:taylor", "sde-dpm-solver++:20:taylor"):
        v = by_spec.get(spec, {}).get("vs_uncached")
        if v is not None:
            out[spec] = dict(v, held=dict(evals=v["evals"] >= 3, speedup=v["speedup"] >= 2.5,
                                          fd=v["fd_ratio"] <= 1.05, accuracy=v["accuracy_points"] >= -1))
    ref = by_spec.get("ddpm:250")
    if ref is not None:
        ok = [r for r in rows if "seconds" in r and r is not ref and r["frechet_distance"] <= ref["frechet_distance"]]
        if ok:
            best = min(ok, key=lambda r: r["seconds"])
            out["fastest_at_ddpm250_fd"] = dict(config=best["config"], speedup=ref["seconds"] / best["seconds"],
                                                held=ref["seconds"] / best["seconds"] >= 15)
    return out


def markdown(report: Dict[str, Any]) -> str:
    lines = ["| configuration | full evals | forecast steps | accuracy | Fréchet distance | seconds | cache reuse "
             "| vs uncached: evals / speed / FD | vs DDPM-250: speed / FD |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(r, key, spec):  # blank where a column does not apply (real digits, no cache)
        return format(r[key], spec) if key in r else ""

    for r in report["rows"]:
        u, d = r.get("vs_uncached"), r.get("vs_ddpm250")
        lines.append(f"| {r['config']} | {fmt(r, 'model_evals', 'd')} | {fmt(r, 'forecast_steps', 'd')} | "
                     f"{r['accuracy']:.4f} | {r['frechet_distance']:.3f} | {fmt(r, 'seconds', '.1f')} | "
                     f"{fmt(r, 'reuse_fraction', '.2f')} | "
                     + (f"{u['evals']:.2f}x / {u['speedup']:.2f}x / {u['fd_ratio']:.3f}" if u else "") + " | "
                     + (f"{d['speedup']:.2f}x / {d['fd_ratio']:.3f}" if d else "") + " |")
    return "\n".join(lines)


def pareto_plot(report: Dict[str, Any], path: str) -> None:
    """Fréchet distance against seconds, one point per configuration (Pareto-optimal ones joined)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "seconds" in r]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        kind = "taylor" if r.get("taylor") else ("step" if "reuse_fraction" in r else "uncached")
        ax.scatter(r["seconds"], r["frechet_distance"], marker={"uncached": "o", "taylor": "^", "step": "s"}[kind],
                   color={"uncached": "tab:blue", "taylor": "tab:red", "step": "tab:green"}[kind])
        ax.annotate(r["config"], (r["seconds"], r["frechet_distance"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: r["seconds"]):
        if r["frechet_distance"] < best:
            best = r["frechet_distance"]
            front.append(r)
    ax.plot([r["seconds"] for r in front], [r["frechet_distance"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(f"seconds to sample {report['num_samples']} digits (log)")
    ax.set_ylabel("Fréchet distance (classifier features)")
    cfg = report["model_config"]
    ax.set_title(f"digits DiT depth {cfg['depth']}, width {cfg['hidden_size']}: o uncached, ^ taylor, s step cache",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit_fast.sampling.quality", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a digits DiT checkpoint")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="sampler:steps[:skip_type][:cache=THRESH][:taylor[=i5,o2,f2,l0,final]] ... "
                        "(default: the list in the module docstring)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key", choices=("ema", "model"), default="ema")
    p.add_argument("--out", default=None, help="write the report as JSON here (and the Pareto plot / markdown "
                                               "table beside it, .png / .md)")
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
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        pareto_plot(report, stem + ".png")
        with open(stem + ".md", "w") as f:
            f.write(markdown(report) + "\n")
    for name, g in report["goals"].items():
        print(f"goal {name}: {json.dumps(g)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
