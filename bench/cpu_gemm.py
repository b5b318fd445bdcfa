"""CPU GEMM candidates for DiT's Linear layers at DiT-S/2's shapes (batch 8, 256 px: 2048 token rows;
the stacked adaLN projection: 8 rows, dit_fast's few-rows kernel), torch's thread count.

float32:
- torch:          F.linear (MKL sgemm);
- ours:           dit_fast's GEMM (csrc/cpu/gemm.cpp), which reorders the weight in every call;
- onednn:         torch.ops.mkldnn._linear_pointwise on a weight from _reorder_linear_weight;
- onednn+reorder: the same, reordering the weight in every call;
- onednn-plain:   _linear_pointwise on the plain (N, K) weight (fc1: also with dit_fast's GELU);
- mkl:            torch.ops.mkl._mkl_linear on a weight from _mkl_reorder_linear_weight;
- mkl+reorder:    the same, reordering in every call.
bfloat16 (`--dtypes bf16`):
- ours:           dit_fast's GEMM on bf16 operands (widened inside, float32 sums);
- torch-f32copy:  F.linear in float32 on float32 copies of the operands, rounded back to bf16;
- torch:          F.linear in bf16 (oneDNN / MKL's bf16 path);
- onednn-plain:   _linear_pointwise in bf16, where oneDNN has a bf16 GEMM on this CPU.

fc1 (K 384 -> N 1536) includes the tanh-GELU: oneDNN and ours in the GEMM's epilogue, the others
as the GEMM without bias followed by dit_fast's in-place bias + GELU kernel (what the model runs).
Also timed: the weight preparation alone (reorder).

All candidates run interleaved in one process (round r: A B C ..., repeated), each round timing a
few calls; the table gives the median per-call time and the min-max over rounds, in GFLOP/s
(2 M K N / time). Private torch ops that this torch lacks are skipped with the reason recorded.

`--model`: the same choice in the whole model instead: a DiT-S/2 batch-8 forward in each dtype
with each kind of token Linear forced onto each candidate path (dit_fast.ops.linear._path; the
adaLN projection as chosen), interleaved.

    python bench/cpu_gemm.py [--dtypes f32,bf16] [--rounds 9] [--calls 3] [--out bench/results/cpu-gemm-<isa>.json]
    python bench/cpu_gemm.py --model [--rounds 6] [--out bench/results/cpu-linear-model-<isa>.json]
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
    ("fc1+gelu", 2048, 384, 1536, True), ("fc2", 2048, 1536, 384, False),
    ("adaLN", 8, 384, 12 * 6 * 384 + 2 * 384, False))  # all blocks' projections, one row per sample


def _private_op(ns: str, name: str):
    try:
        return getattr(getattr(torch.ops, ns), name)
    except (AttributeError, RuntimeError):
        return None


def candidates(x, w, b, gelu, M, skipped):
    """name -> zero-argument callable computing the layer (GELU included where `gelu`), and the
    weight preparations alone."""
    ops = torch.ops.dit_fast
    gelu_ = ops.gelu_bias_fwd_

    def then_gelu(h):
        gelu_(h, b)
        return h

    def torch_fn(x=x, w=w, b=b):
        return F.linear(x, w, b) if not gelu else then_gelu(F.linear(x, w))

    fns = {"ours": lambda: ops.linear_fwd(x, w, b, gelu), "torch": torch_fn}
    prep = {}
    bf16 = x.dtype == torch.bfloat16
    if bf16:
        fns["torch-f32copy"] = lambda: (F.linear(*(t.float() for t in (x, w, b))).bfloat16() if not gelu
                                        else then_gelu(F.linear(x.float(), w.float()).bfloat16()))
    reorder, pointwise = _private_op("mkldnn", "_reorder_linear_weight"), _private_op("mkldnn", "_linear_pointwise")
    attr, alg = ("gelu", "tanh") if gelu else ("none", "")
    if reorder is None or pointwise is None or not torch.backends.mkldnn.is_available():
        skipped["onednn"] = "torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise missing"
    elif bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        skipped["onednn bf16"] = "oneDNN has no bf16 GEMM on this CPU"
    elif bf16:
        fns["onednn-plain"] = lambda: pointwise(x, w, b, attr, [], alg)
    else:
        wo = reorder(w, M)
        fns["onednn"] = lambda: pointwise(x, wo, b, attr, [], alg)
        fns["onednn+reorder"] = lambda: pointwise(x, reorder(w, M), b, attr, [], alg)
        fns["onednn-plain"] = lambda: pointwise(x, w, b, attr, [], alg)
        if gelu:  # oneDNN's GEMM without its GELU epilogue, then dit_fast's bias + GELU in place
            fns["onednn-plain+gelu_"] = lambda: then_gelu(pointwise(x, w, None, "none", [], ""))
        prep["onednn"] = lambda: reorder(w, M)

    mreorder, mlinear = _private_op("mkl", "_mkl_reorder_linear_weight"), _private_op("mkl", "_mkl_linear")
    if bf16:
        pass
    elif mreorder is None or mlinear is None or not torch.backends.mkl.is_available():
        skipped["mkl"] = "torch.ops.mkl._mkl_reorder_linear_weight / _mkl_linear missing"
    else:
        wm = mreorder(w, M)

        def mkl_fn(wm_fn):
            return mlinear(x, wm_fn(), w, b, M) if not gelu else then_gelu(mlinear(x, wm_fn(), w, None, M))
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


MODEL_PATHS = {  # name -> (GEMM for fc1 + GELU, GEMM for qkv / proj / fc2 / final)
    "ours / torch": ("dit_fast", "torch"), "ours / ours": ("dit_fast", "dit_fast"),
    "ours / onednn": ("dit_fast", "onednn"), "onednn / onednn": ("onednn", "onednn")}


def model_rows(rounds):
    """DiT-S/2 batch-8 forward, each dtype x Linear assignment, interleaved: rows of medians."""
    from dit_fast.models import DiT_models
    from dit_fast.ops import linear as lin
    auto, rows = lin._path, []
    x = torch.randn(8, 4, 32, 32)
    t, y = torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (8,))
    fns = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = DiT_models["DiT-S/2"]().eval().to(dtype)
        xd = x.to(dtype)
        for name, (fc1, plain) in {"auto": (None, None), **MODEL_PATHS}.items():
            if "onednn" in (fc1, plain) and lin._onednn_missing() is not None:
                continue
            if dtype == torch.bfloat16 and "onednn" in (fc1, plain) and not lin._onednn_bf16():
                continue  # oneDNN refuses bf16 without bf16 dot products
            def path(dt, gelu, few=False, fc1=fc1, plain=plain):
                if fc1 is None or few:  # the adaLN projection (few rows): as chosen
                    return auto(dt, gelu, few)
                gemm = fc1 if gelu else plain
                # ours takes bf16 operands; torch's bf16 GEMM is far slower: float32 copies instead
                return gemm, (dt if gemm == "dit_fast" else torch.float32), "forced"

            def fn(model=model, xd=xd, path=path):
                lin._path = path
                try:
                    return model(xd, t, y)
                finally:
                    lin._path = auto
            fns[f"{str(dtype)[6:]} {name}"] = fn
    with torch.inference_mode():
        times = time_interleaved(fns, rounds, 1)
    for k, v in times.items():
        rows.append({"case": k, "ms": statistics.median(v) * 1e3, "ms_range": [min(v) * 1e3, max(v) * 1e3]})
        print(f"  {k:28s} {rows[-1]['ms']:8.1f} ms [{min(v) * 1e3:.1f}-{max(v) * 1e3:.1f}]")
    return rows


def gemm_rows(dtypes, rounds, calls, skipped):
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for name, M, K, N, gelu in SHAPES:
                x, w, b = (t.to(dtype) for t in (torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)))
                fns, prep = candidates(x, w, b, gelu, M, skipped)
                ref = lin_ref(x, w, b, gelu)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                for k, fn in fns.items():  # every candidate computes the same layer
                    torch.testing.assert_close(fn().double(), ref, atol=tol, rtol=tol,
                                               msg=lambda m, k=k: f"{name} {k}: {m}")
                t = time_interleaved(fns, rounds, calls)
                tp = time_interleaved(prep, rounds, calls)
                flop = 2 * M * K * N
                row = {"layer": name, "dtype": str(dtype)[6:], "M": M, "K": K, "N": N, "gelu": gelu,
                       "gflops": {}, "ms": {}, "ms_range": {},
                       "prep_ms": {k: statistics.median(v) * 1e3 for k, v in tp.items()}}
                for k, v in t.items():
                    med = statistics.median(v)
                    row["ms"][k] = med * 1e3
                    row["ms_range"][k] = [min(v) * 1e3, max(v) * 1e3]
                    row["gflops"][k] = flop / med / 1e9
                rows.append(row)
                base = row["ms"]["torch"]
                print(f"\n{name} {row['dtype']}: M={M} K={K} N={N}  (GFLOP/s median; ms median [min-max]; "
                      "x = torch time / time)")
                for k in t:
                    lo, hi = row["ms_range"][k]
                    print(f"  {k:18s} {row['gflops'][k]:6.1f}  {row['ms'][k]:7.2f} [{lo:6.2f}-{hi:6.2f}]  "
                          f"{base / row['ms'][k]:.2f}x")
                if row["prep_ms"]:
                    print("  prep (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in row["prep_ms"].items()))
    return rows


def lin_ref(x, w, b, gelu):
    out = F.linear(x.double(), w.double(), b.double())
    return F.gelu(out, approximate="tanh") if gelu else out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="f32,bf16", help="GEMMs alone: f32 and/or bf16")
    ap.add_argument("--model", action="store_true", help="time the whole model instead (see above)")
    ap.add_argument("--rounds", type=int, default=None, help="default 9 (GEMMs), 6 (--model)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/cpu-gemm-<isa>.json, --model: cpu-linear-model-<isa>.json)")
    args = ap.parse_args()
    reason = _backends._probe("cpu")
    if reason is not None:
        raise SystemExit(f"the cpu backend cannot run: {reason}")
    dtypes = [{"f32": torch.float32, "bf16": torch.bfloat16}[d.strip()] for d in args.dtypes.split(",")]
    isa = cpu_isa_info()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}, "
          f"ISA: {isa['summary']}")
    skipped = {}
    load0 = os.getloadavg()
    if args.model:
        rounds = args.rounds or 6
        result = {"kind": "cpu_linear_model", "model": "DiT-S/2", "batch": 8, "rows": model_rows(rounds)}
        default = f"cpu-linear-model-{isa['active']}.json"
    else:
        rounds = args.rounds or 9
        result = {"kind": "cpu_gemm", "calls_per_round": args.calls,
                  "rows": gemm_rows(dtypes, rounds, args.calls, skipped)}
        default = f"cpu-gemm-{isa['active']}.json"
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        **result, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "machine": platform.machine(), "cpu": isa["model"], "cpu_count": os.cpu_count(),
        "threads": threads, "isa": isa, "load_avg_start": load0, "load_avg_end": os.getloadavg(),
        "rounds": rounds, "skipped": skipped}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
