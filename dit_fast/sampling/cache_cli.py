"""The `--cache none|step|taylor` flags of `python -m dit_fast.sample` and `dit_fast.sample_ddp`.

    --cache none                 the plain model (default)
    --cache step                 StepCache (deep-block reuse); threshold --step-cache THRESH (0.1 when
                                 not given). `--step-cache THRESH` alone means `--cache step`.
    --cache taylor               TaylorCache (forecasting); its parameters default per sampler
                                 (TAYLOR_DEFAULTS, chosen by measurement: bench/results/quality-*.json)
      --cache-interval N         a full model evaluation every N steps
      --cache-order K            Taylor expansion order (0: reuse)
      --cache-first-steps F      steps always computed at the start
      --cache-last-steps L       steps always computed at the end
      --cache-features output|final|blocks
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from .taylor_cache import FEATURES, TaylorCache

__all__ = ["CACHES", "TAYLOR_DEFAULTS", "add_cache_args", "build_cache", "cache_settings", "taylor_settings"]

CACHES = ("none", "step", "taylor")
STEP_DEFAULT_THRESHOLD = 0.1

# Per sampler, chosen by measurement on the digits models (bench/results/quality-*.json): a second-order
# expansion; on the stochastic samplers (and DPM-Solver++, whose update reads the x0 prediction) the
# x0-space forecast ("output"), on DDIM the last hidden state ("final": more accurate there, at the
# cost of running the embeddings and the final layer on forecast steps).
TAYLOR_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ddpm": dict(interval=5, order=2, first_steps=2, last_steps=0, features="output"),
    "ddim": dict(interval=5, order=2, first_steps=2, last_steps=0, features="final"),
    "dpm-solver++": dict(interval=4, order=2, first_steps=2, last_steps=0, features="output"),
    "sde-dpm-solver++": dict(interval=4, order=2, first_steps=2, last_steps=0, features="output"),
}
_TAYLOR_FLAGS = {"interval": "--cache-interval", "order": "--cache-order", "first_steps": "--cache-first-steps",
                 "last_steps": "--cache-last-steps", "features": "--cache-features"}


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", choices=CACHES, default=None,
                   help="feature cache: none (default), step (StepCache, --step-cache THRESH) or taylor "
                        "(TaylorCache: forecast features between full evaluations; defaults per sampler)")
    p.add_argument("--cache-interval", type=int, default=None, help="taylor: a full evaluation every N steps")
    p.add_argument("--cache-order", type=int, default=None, help="taylor: Taylor expansion order (0: reuse)")
    p.add_argument("--cache-first-steps", type=int, default=None, help="taylor: steps always computed first")
    p.add_argument("--cache-last-steps", type=int, default=None, help="taylor: steps always computed last")
    p.add_argument("--cache-features", choices=FEATURES, default=None,
                   help="taylor: what is forecast: output (the x0 prediction), final (the last hidden state) "
                        "or blocks (every block's attention and MLP outputs)")


def cache_settings(args) -> Dict[str, Any]:
    """The resolved cache name and parameters (for run metadata). Raises ValueError with the flag
    named for bad combinations; call after `args.sampler` is known."""
    name = args.cache
    step = getattr(args, "step_cache", 0.0) or 0.0
    if name is None:
        name = "step" if step > 0 else "none"
    if step > 0 and name != "step":
        raise ValueError(f"--step-cache {step} means --cache step; it cannot be combined with --cache {name}")
    if name == "taylor":
        return dict(cache="taylor", **taylor_settings(args))
    if name == "step":
        return dict(cache="step", threshold=step if step > 0 else STEP_DEFAULT_THRESHOLD)
    given = [flag for key, flag in _TAYLOR_FLAGS.items() if getattr(args, "cache_" + key, None) is not None]
    if given:
        raise ValueError(f"{given[0]} applies to --cache taylor, not --cache {name}")
    return dict(cache="none")


def taylor_settings(args) -> Dict[str, Any]:
    if args.sampler not in TAYLOR_DEFAULTS:
        raise ValueError(f"--cache taylor does not support --sampler {args.sampler} "
                         f"(supported: {', '.join(TAYLOR_DEFAULTS)})")
    cfg = dict(TAYLOR_DEFAULTS[args.sampler])
    for key, flag in _TAYLOR_FLAGS.items():
        value = getattr(args, "cache_" + key, None)
        if value is not None:
            cfg[key] = value
    for key, lo in (("interval", 1), ("order", 0), ("first_steps", 1), ("last_steps", 0)):
        if cfg[key] < lo:
            raise ValueError(f"{_TAYLOR_FLAGS[key]} must be >= {lo}, got {cfg[key]}")
    if cfg["order"] >= 16:
        raise ValueError(f"--cache-order must be < 16, got {cfg['order']}")
    if getattr(args, "compile", False) or getattr(args, "cuda_graph", False):
        raise ValueError("--cache taylor runs in the eager loop (it decides full / forecast steps on the host); "
                         "it cannot be combined with --compile or --cuda-graph")
    return cfg


def build_cache(args, net, model, steps: int):
    """The network to sample with for --cache: `net` (the model, or the StepCache that --step-cache
    already built), a StepCache for --cache step, or a TaylorCache over `model`."""
    from .step_cache import StepCache

    s = cache_settings(args)
    if s["cache"] == "taylor":
        if steps <= s["first_steps"] + s["last_steps"]:
            raise ValueError(f"--cache taylor with --num-sampling-steps {steps}: every step would be computed "
                             f"(--cache-first-steps {s['first_steps']} + --cache-last-steps {s['last_steps']}); "
                             f"use more steps or --cache none")
        kw = {k: v for k, v in s.items() if k != "cache"}
        return TaylorCache(model, steps, **kw)
    if s["cache"] == "step" and not isinstance(net, StepCache):
        args.step_cache = s["threshold"]                  # the threshold in effect (run metadata)
        depth = len(model.blocks)
        if not 1 <= args.cache_shallow_blocks < depth:
            raise ValueError(f"--cache-shallow-blocks must be in [1, {depth - 1}] for this depth-{depth} model, "
                             f"got {args.cache_shallow_blocks}")
        if getattr(args, "compile", False) or getattr(args, "cuda_graph", False):
            raise ValueError("--cache step cannot be combined with --compile or --cuda-graph (its skip decision "
                             "runs on the host at every step)")
        return StepCache(model, threshold=s["threshold"], shallow_blocks=args.cache_shallow_blocks)
    return net
