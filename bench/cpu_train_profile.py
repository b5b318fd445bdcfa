"""Where a CPU training step's time goes: one DiT training step (forward + backward + AdamW) under
torch.profiler, its ops grouped into GEMMs (matmul / linear / conv / attention kernels) and the rest,
and the AdamW step alone with torch's three CPU implementations (for-loop, foreach, fused), timed
in turns on the same parameters and gradients.

    python bench/cpu_train_profile.py [--model DiT-S/2] [--batch-size 8] [--backend auto]

Writes bench/results/cpu-train-profile-<isa>.json (--out to change).
"""
import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dit_fast  # noqa: E402
from dit_fast import DiT_models  # noqa: E402
from dit_fast.diffusion import create_diffusion  # noqa: E402
from dit_fast.ops.linear import cpu_isa_info  # noqa: E402
from dit_fast.train import make_optimizer  # noqa: E402

# aten ops that are GEMMs (or attention, whose time is its two GEMMs and a softmax).
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
            "aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution",
            "dit_fast::attention", "mkldnn::", "dit_fast::patch_embed")


def is_gemm(name):
    return any(name.startswith(p) for p in GEMM_OPS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--opt-rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    isa = cpu_isa_info()
    model = DiT_models[args.model](input_size=args.image_size // 8)
    n, lat = args.batch_size, args.image_size // 8
    x, y = torch.randn(n, 4, lat, lat), torch.randint(0, 1000, (n,))
    t = torch.randint(0, 1000, (n,))
    diffusion = create_diffusion("")
    opt = make_optimizer(model.parameters(), torch.device("cpu"))  # dit_fast.train's (fused AdamW)

    def step():
        with dit_fast.use_backend(args.backend):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    load0 = os.getloadavg()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    gemm = sum(e.self_cpu_time_total for e in events if is_gemm(e.key)) / 1e3
    top = sorted((e for e in events if not is_gemm(e.key)), key=lambda e: -e.self_cpu_time_total)[:25]
    rest = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in top]
    print(f"{args.model} batch {n} fp32 train step ({args.backend}), {torch.get_num_threads()} threads, "
          f"ISA {isa['summary']}")
    print(f"profiled step: {total:.0f} ms self CPU; GEMM/attention {gemm:.0f} ms ({gemm / total:.0%}); "
          f"other {total - gemm:.0f} ms")
    for r in rest:
        print(f"  {r['op']:<55s}{r['self_ms']:9.1f} ms {r['calls']:6d} calls")

    # The optimizer step alone: torch's three AdamW implementations, in turns, same grads.
    params = [p for p in model.parameters()]
    grads = [torch.randn_like(p) for p in params]
    variants = {"for-loop (default on CPU)": dict(foreach=False), "foreach": dict(foreach=True),
                "fused": dict(fused=True)}
    opts = {}
    for name, kw in variants.items():
        ps = [copy.deepcopy(p.detach()).requires_grad_() for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        try:
            opts[name] = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0, **kw)
        except (RuntimeError, ValueError) as e:
            print(f"  AdamW {name}: not available ({e})")
    times = {k: [] for k in opts}
    for o in opts.values():
        o.step()
    for _ in range(args.opt_rounds):
        for name, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    opt_ms = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}
    print("AdamW step alone (ms, median [min-max]): " + "; ".join(
        f"{k} {v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]" for k, v in opt_ms.items()))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-train-profile-{isa['active']}.json"
    out.write_text(json.dumps({
        "kind": "cpu_train_profile", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "cpu": isa["model"], "isa": isa, "threads": torch.get_num_threads(),
        "model": args.model, "batch": n, "backend": args.backend, "load_avg_start": load0,
        "load_avg_end": os.getloadavg(), "profiled_ms": total, "gemm_ms": gemm, "other_top": rest,
        "adamw_step_ms": opt_ms}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
