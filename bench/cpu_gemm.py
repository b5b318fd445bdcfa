"""CPU GEMM candidates for DiT's token Linear layers at DiT-S/2's shapes (batch 8, 256 px: 2048 rows),
float32, torch's thread count:

- torch:          F.linear (MKL sgemm);
- ours:           dit_fast's packed GEMM (csrc/cpu/gemm.cpp), weight packed beforehand;
- ours+pack:      the same, packing the weight in every call (what an uncached design pays);
- onednn:         torch.ops.mkldnn._linear_pointwise on a weight from _reorder_linear_weight;
- onednn+reorder: the same, reordering the weight in every call;
- onednn-plain:   _linear_pointwise on the plain (N, K) weight (fc1: also with dit_fast's GELU);
- mkl:            torch.ops.mkl._mkl_linear on a weight from _mkl_reorder_linear_weight;
- mkl+reorder:    the same, reordering in every call.

fc1 (K 384 -> N 1536) includes the tanh-GELU: oneDNN and ours in the GEMM's epilogue, torch and mkl
as the GEMM without bias followed by dit_fast's in-place bias + GELU kernel (what the model runs).
Also timed: the weight preparation alone (pack / reorder).

All candidates run interleaved in one process (round r: A B C ..., repeated), each round timing a
few calls; the table gives the median per-call time and the min-max over rounds, in GFLOP/s
(2 M K N / time). Private torch ops that this torch lacks are skipped with the reason recorded.

    python bench/cpu_gemm.py [--rounds 9] [--calls 3] [--out bench/results/cpu-gemm-<isa>.json]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_fast import _backends  # noqa: E402
from dit_fast.ops.linear import cpu_isa_info  # noqa: E402

SHAPES = (  # name, M, K, N, gelu
    ("qkv", 2048, 384, 1152, False), ("proj", 2048, 384, 384, False),
    ("fc1+gelu", 2048, 384, 1536, True), ("fc2", 2048, 1536, 384, False))


def _private_op(ns: str, name: str):
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return None


def candidates(x, w, b, gelu, M, skipped):
    """name -> zero-argument callable computing the layer (GELU included where `gelu`)."""
    ops = torch.ops.dit_fast
    gelu_ = ops.gelu_bias_fwd_

    def torch_fn():
        if not gelu:
            return F.linear(x, w, b)
        h = F.linear(x, w)
        gelu_(h, b)
        return h

    packed = ops.linear_pack(w)
    fns = {"torch": torch_fn,
           "ours": lambda: ops.linear_packed(x, packed, b, w.shape[0], gelu),
           "ours+pack": lambda: ops.linear_packed(x, ops.linear_pack(w), b, w.shape[0], gelu)}
    prep = {"ours": lambda: ops.linear_pack(w)}

    reorder, pointwise = _private_op("mkldnn", "_reorder_linear_weight"), _private_op("mkldnn", "_linear_pointwise")
    if reorder is None or pointwise is None or not torch.backends.mkldnn.is_available():
        skipped["onednn"] = "torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise missing"
    else:
        attr, alg = ("gelu", "tanh") if gelu else ("none", "")
        wo = reorder(w, M)
        fns["onednn"] = lambda: pointwise(x, wo, b, attr, [], alg)
        fns["onednn+reorder"] = lambda: pointwise(x, reorder(w, M), b, attr, [], alg)
        fns["onednn-plain"] = lambda: pointwise(x, w, b, attr, [], alg)
        if gelu:  # oneDNN's GEMM without its GELU epilogue, then dit_fast's bias + GELU in place
            def onednn_gelu_():
                h = pointwise(x, w, None, "none", [], "")
                gelu_(h, b)
                return h
            fns["onednn-plain+gelu_"] = onednn_gelu_
        prep["onednn"] = lambda: reorder(w, M)

    mreorder, mlinear = _private_op("mkl", "_mkl_reorder_linear_weight"), _private_op("mkl", "_mkl_linear")
    if mreorder is None or mlinear is None or not torch.backends.mkl.is_available():
        skipped["mkl"] = "torch.ops.mkl._mkl_reorder_linear_weight / _mkl_linear missing"
    else:
        wm = mreorder(w, M)

        def mkl_fn(wm_fn):
            if not gelu:
                return mlinear(x, wm_fn(), w, b, M)
            h = mlinear(x, wm_fn(), w, None, M)
            gelu_(h, b)
            return h
        fns["mkl"] = lambda: mkl_fn(lambda: wm)
        fns["mkl+reorder"] = lambda: mkl_fn(lambda: mreorder(w, M))
        prep["mkl"] = lambda: mreorder(w, M)
    return fns, prep


def time_interleaved(fns, rounds, calls):
    """name -> list of per-call seconds, one entry per round; rounds interleave the candidates."""
    for fn in fns.values():  # warm-up (primitive creation, page faults)
        fn(), fn()
    times = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # alternate the order: no fixed slot
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu-gemm-<isa>.json)")
    args = ap.parse_args()
    reason = _backends._probe("cpu")
    if reason is not None:
        raise SystemExit(f"the cpu backend cannot run: {reason}")
    isa = cpu_isa_info()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}, "
          f"ISA: {isa['summary']}")
    rows, skipped = [], {}
    load0 = os.getloadavg()
    with torch.no_grad():
        for name, M, K, N, gelu in SHAPES:
            x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
            fns, prep = candidates(x, w, b, gelu, M, skipped)
            ref = torch_ref = fns["torch"]()
            for k, fn in fns.items():  # every candidate computes the same layer
                torch.testing.assert_close(fn(), ref, atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{name} {k}: {m}")
            del torch_ref
            t = time_interleaved(fns, args.rounds, args.calls)
            tp = time_interleaved(prep, args.rounds, args.calls)
            flop = 2 * M * K * N
            row = {"layer": name, "M": M, "K": K, "N": N, "gelu": gelu, "gflops": {}, "ms": {}, "ms_range": {},
                   "prep_ms": {k: statistics.median(v) * 1e3 for k, v in tp.items()}}
            for k, v in t.items():
                med = statistics.median(v)
                row["ms"][k] = med * 1e3
                row["ms_range"][k] = [min(v) * 1e3, max(v) * 1e3]
                row["gflops"][k] = flop / med / 1e9
            rows.append(row)
            base = row["ms"]["torch"]
            print(f"\n{name}: M={M} K={K} N={N}  (GFLOP/s median; ms median [min-max]; x = torch time / time)")
            for k in t:
                lo, hi = row["ms_range"][k]
                print(f"  {k:18s} {row['gflops'][k]:6.1f}  {row['ms'][k]:7.2f} [{lo:6.2f}-{hi:6.2f}]  "
                      f"{base / row['ms'][k]:.2f}x")
            print("  prep (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in row["prep_ms"].items()))
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-gemm-{isa['active']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "kind": "cpu_gemm", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "machine": platform.machine(), "cpu": isa["model"], "cpu_count": os.cpu_count(),
        "threads": threads, "isa": isa, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
        "rounds": args.rounds, "calls_per_round": args.calls, "skipped": skipped, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
