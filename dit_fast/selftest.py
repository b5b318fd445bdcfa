"""Checks that dit_fast's kernels compute what their references do, on this machine's device.

    python -m dit_fast.selftest [--device cpu|cuda] [--json PATH] [--interpreter] [--ops A,B] [--no-model]
    dit-fast selftest ...

1. Op level (`dit_fast.validation.op_checks`): every registered op x every backend that runs on the
   device x every dtype it supports, against the op's reference with the project's tolerance table,
   forward and backward, at DiT-XL/2's shapes and odd ones. `--interpreter` adds the Triton kernels
   under Triton's interpreter (CPU only; slow).
2. Model level: the fused DiT (backend ``auto``) against the ``reference`` backend, for head dims 64
   and 72 (hidden 128 / 144, 2 heads, 9 tokens): the forward, the parameter gradients of one
   training step (the diffusion training loss) and a short guided DPM-Solver++ sampling loop in each
   loop mode the device supports (CPU: eager, and compile when torch.compile works here; CUDA: also
   cuda_graph and compile_cuda_graph; the compiled modes at head dim 72 only).
   Rule: both paths are compared with a float64 run of the reference backend on the same
   (rounded) weights and inputs. Errors are max |result - float64| / max |float64| per tensor (the
   worst tensor for gradients); a check passes when the fused path's error is at most twice the
   reference backend's own error at that dtype plus the dtype's floor (dit_fast.tolerances atol).

One line per check (PASS/FAIL, what, backend, dtype, shape, error, tolerance, seconds); `--json PATH`
writes the checks as a list of objects. Exit status: 0 all passed, 1 a check failed (the summary
names each), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from . import tolerances

# (head dim, hidden size): 2 heads each; 6x6 latents with patch 2 -> 9 tokens (no block multiple).
MODEL_HEAD_DIMS = ((64, 128), (72, 144))
LATENT = dict(input_size=6, patch_size=2, in_channels=4)
NUM_CLASSES = 10
SAMPLING_STEPS = 4
CFG_SCALE = 4.0
# The compiled loop modes run for this head dim only (DiT-XL/2's; each compile costs seconds to
# minutes), and on CPU only when compiling a trivial function takes at most CPU_COMPILE_PROBE_S.
COMPILE_HEAD_DIM = 72
CPU_COMPILE_PROBE_S = 20.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def loop_modes(device: str) -> List[str]:
    return ["eager", "compile"] + (["cuda_graph", "compile_cuda_graph"] if device == "cuda" else [])


# ---- building blocks --------------------------------------------------------------------------

def make_model(head_dim: int, hidden: int, device: str, seed: int = 0):
    """A small DiT with every trainable weight random (the zero-initialized adaLN / output layers
    too, so every path matters)."""
    from .models import DiT

    torch.manual_seed(seed)
    model = DiT(**LATENT, hidden_size=hidden, depth=2, num_heads=hidden // head_dim,
                num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(device)


def _inputs(n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = LATENT["input_size"]
    x = torch.randn(n, LATENT["in_channels"], s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def _rel_errors(got: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> float:
    """max over tensors of max |got - truth| / max |truth| (nan if anything is not finite)."""
    worst = 0.0
    for a, b in zip(got, truth):
        a, b = a.detach().double(), b.detach().double()
        if not torch.isfinite(a).all():
            return float("nan")
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def _compare(what: str, dtype: torch.dtype, shape: str, kind: str,
             run: Callable[[str, torch.dtype], Sequence[torch.Tensor]]):
    """CheckResult of run("auto", dtype) against run("reference", float64), held to twice
    run("reference", dtype)'s own error plus the dtype's floor (see the module docstring)."""
    from .validation import CheckResult

    t0 = time.perf_counter()
    try:
        truth = run("reference", torch.float64)
        ref_err = _rel_errors(run("reference", dtype), truth)
        err = _rel_errors(run("auto", dtype), truth)
        bound = 2 * ref_err + tolerances.tol(dtype, kind)["atol"]
        return CheckResult(what, "auto", _dtype_name(dtype), shape, err, bound, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed check, not a crashed selftest
        return CheckResult(what, "auto", _dtype_name(dtype), shape, float("nan"), float("nan"),
                           time.perf_counter() - t0, error=_short_error(e))


def _short_error(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:]
    loc = f" (at {where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{loc}"


def _with_dtype(base, dtype):
    return copy.deepcopy(base).to(dtype)


# ---- model-level checks -----------------------------------------------------------------------

def forward_check(base, head_dim: int, dtype: torch.dtype, device: str):
    from . import use_backend

    x, t, y = _inputs(3, device)

    def run(backend, dt):
        m = _with_dtype(base, dt).eval()
        with torch.no_grad(), use_backend(backend):
            return [m(x.to(dtype).to(dt), t, y)]

    return _compare(f"model fwd hd{head_dim}", dtype, f"3x{base.x_embedder.num_patches}x"
                    f"{base.pos_embed.shape[-1]}", "fwd", run)


def train_grads_check(base, head_dim: int, dtype: torch.dtype, device: str):
    """Gradients of every trainable parameter after one training step's loss (the learned-sigma
    diffusion loss: MSE + variational bound) on fixed t, noise and label dropout. The loss is
    computed in float32 from the model's output (the model runs in `dtype`)."""
    from . import use_backend
    from .diffusion import create_diffusion

    diffusion = create_diffusion(timestep_respacing="")
    x, t, y = _inputs(3, device, seed=1)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)

    def run(backend, dt):
        m = _with_dtype(base, dt).train()
        torch.manual_seed(4)  # the same label dropout in every run
        with use_backend(backend):
            losses = diffusion.training_losses(
                lambda x_t, tt, **kw: m(x_t.to(dtype).to(dt), tt, **kw),
                x.to(dtype).to(dt), t, model_kwargs=dict(y=y), noise=noise.to(dtype).to(dt))
            losses["loss"].float().mean().backward()
        return [p.grad for p in m.parameters() if p.requires_grad]

    return _compare(f"train grads hd{head_dim}", dtype, "3 samples", "grad", run)


def sampling_check(base, head_dim: int, dtype: torch.dtype, device: str, mode: str):
    """A guided DPM-Solver++ loop (forward_with_cfg, cfg 4) of SAMPLING_STEPS steps in `mode`; the
    reference and float64 runs are eager."""
    from . import use_backend
    from .sampling.loops import LoopRunner, make_sampler

    n = 2
    z, _, y = _inputs(n, device, seed=3)
    z = torch.cat([z, z])
    y = torch.cat([y, torch.full_like(y, NUM_CLASSES)])  # the null class for the unconditional half

    def run(backend, dt):
        m = _with_dtype(base, dt).eval()
        runner = LoopRunner(m.forward_with_cfg, make_sampler("dpm-solver++", SAMPLING_STEPS),
                            mode=mode if backend == "auto" else "eager")
        with use_backend(backend):
            return [runner(z.to(dtype).to(dt), dict(y=y, cfg_scale=CFG_SCALE))]

    return _compare(f"sample {mode} hd{head_dim}", dtype, f"{2 * n}x{SAMPLING_STEPS} steps", "fwd", run)


def compile_skip_reason(device: str) -> Optional[str]:
    """None if torch.compile works on `device` (quickly enough on CPU), else why not."""
    try:
        t0 = time.perf_counter()
        f = torch.compile(lambda v: torch.sin(v) * 2 + 1, dynamic=False)
        v = torch.randn(8, device=device)
        torch.testing.assert_close(f(v), torch.sin(v) * 2 + 1)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return f"torch.compile does not work here: {_short_error(e)}"
    if device == "cpu" and seconds > CPU_COMPILE_PROBE_S:
        return f"torch.compile took {seconds:.0f}s for a trivial function (> {CPU_COMPILE_PROBE_S:.0f}s)"
    return None


def model_checks(device: str, skipped: Optional[List[str]] = None) -> Iterator:
    """The model-level CheckResults; skipped checks are appended to `skipped` with the reason."""
    skipped = [] if skipped is None else skipped
    modes = loop_modes(device)
    no_compile = compile_skip_reason(device) if any("compile" in m for m in modes) else None
    for head_dim, hidden in MODEL_HEAD_DIMS:
        base = make_model(head_dim, hidden, device)
        for dtype in (torch.float32, torch.bfloat16):
            yield forward_check(base, head_dim, dtype, device)
            yield train_grads_check(base, head_dim, dtype, device)
        for mode in modes:
            if "compile" in mode and head_dim != COMPILE_HEAD_DIM:
                continue
            if "compile" in mode and no_compile:
                skipped.append(f"sample {mode} hd{head_dim}: {no_compile}")
                continue
            yield sampling_check(base, head_dim, torch.float32, device, mode)


# ---- the command ------------------------------------------------------------------------------

def build_summary() -> Optional[str]:
    """What setup.py recorded about the native extensions (dit_fast/_build.json), one line."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return "; ".join(f"{name} {v['status']} ({v['detail']})" for name, v in info.items())


def parse_args(argv, prog):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the checks to PATH as JSON")
    p.add_argument("--interpreter", action="store_true",
                   help="also check the Triton kernels under Triton's interpreter (CPU only; slow)")
    p.add_argument("--ops", metavar="NAMES", type=lambda v: [o for o in v.split(",") if o],
                   help="op-level checks for these ops only (comma-separated, e.g. ln_modulate,attention)")
    p.add_argument("--no-model", action="store_true", help="skip the model-level checks")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m dit_fast.selftest") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda: no CUDA device (torch {torch.__version__}, "
              f"CUDA {torch.version.cuda})", file=sys.stderr)
        return 2
    if args.interpreter and device != "cpu":
        print(f"{prog}: error: --interpreter runs Triton's interpreter on CPU tensors; use --device cpu",
              file=sys.stderr)
        return 2
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            print(f"{prog}: error: --json {args.json}: directory {parent} does not exist", file=sys.stderr)
            return 2
    if args.ops:
        from ._backends import registered_ops
        from . import ops as _  # noqa: F401  registers the ops

        unknown = sorted(set(args.ops) - set(registered_ops()))
        if unknown:
            print(f"{prog}: error: --ops: unknown op(s) {', '.join(unknown)}; choose from "
                  f"{', '.join(registered_ops())}", file=sys.stderr)
            return 2
    if args.interpreter and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before Triton kernels are defined: rerun with it set.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "dit_fast.selftest", *argv], env)

    from . import backends
    from .validation import op_checks

    t_start = time.perf_counter()
    print(f"dit_fast selftest: device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f", torch {torch.__version__}")
    print(f"build: {build_summary() or 'no record (dit_fast/_build.json): not built by setup.py'}")
    for info in backends().values():
        print(f"backend {info}")
    results, skipped = [], []
    print("-- op level")
    for r in op_checks(device, interpreter=args.interpreter, ops=args.ops):
        results.append(r)
        print(r.line(), flush=True)
    if not args.no_model:
        print("-- model level (backend auto vs reference; errors relative to max |float64|)")
        for r in model_checks(device, skipped):
            results.append(r)
            print(r.line(), flush=True)
    for s in skipped:
        print(f"SKIP {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    took = time.perf_counter() - t_start
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks ({took:.0f}s):")
        for r in failed:
            print(f"  {r.what} [{r.backend} {r.dtype}]"
                  + (f": {r.error}" if r.error else f": error {r.max_err:.3g} > tolerance {r.bound:.3g}"))
        return 1
    print(f"OK: {len(results)} checks passed, {len(skipped)} skipped ({took:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
