"""Host (Python / dispatch) overhead per op call, in microseconds, on tiny CPU shapes where the
kernel itself takes a few microseconds.

    PYTHONPATH=$PWD python bench/host_overhead.py --out bench/results/host-overhead-cpu.json

For each op: the public function without grad vs calling the C++ kernel bare
(``torch.ops.dit_fast.*_fwd``), and with grad, public forward + backward vs the bare forward +
backward kernels. overhead = public - bare. Medians over `--repeats` blocks of `--calls` calls,
the variants timed in turns (public, bare, public, bare, ...) so drift on a shared machine hits
both alike. Runs on whatever dit_fast is first on sys.path (PYTHONPATH), so the same script
measures another checkout (e.g. PYTHONPATH=/path/to/main for a before/after comparison).

Also reports the one-time cost of validating kernels on first use (dit_fast._backends.
validation_stats(), where that exists): the first call per (op, backend, dtype, device) vs the
steady state; it stays out of the timed loops above (warm-up calls run first).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

import dit_fast
from dit_fast import _backends
from dit_fast.ops import (attention_qkv, gated_residual, gated_residual_ln_modulate, gelu_bias,
                          ln_modulate, patch_embed, timestep_embedding, unpatchify)

K = torch.ops.dit_fast


def cases(N=1, T=4, D=64, H=2):
    """{name: (public fn, bare fwd fn, inputs, bare fwd+bwd fn or None)}; tiny shapes."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, y = r(N, T, D), r(N, T, D)
    mod = r(N, 6 * D)
    shift, scale, gate = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
    eps = 1e-6

    def ln_bare_bwd(x, shift, scale):
        out, mean, rstd = K.ln_modulate_fwd(x, shift, scale, eps)
        K.ln_modulate_bwd(out, x, scale, mean, rstd)

    def grln_bare_bwd(x, y, gate, shift, scale):
        xn, h, mean, rstd = K.gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, eps)
        K.gated_residual_ln_modulate_bwd(xn, h, xn, y, gate, scale, mean, rstd)

    def gr_bare_bwd(x, y, gate):
        out = K.gated_residual_fwd(x, y, gate)
        K.gated_residual_bwd(out, y, gate)

    h, bias = r(N, T, 4 * D), r(4 * D)

    def gelu_bare_bwd(h, bias):
        out = K.gelu_bias_fwd(h, bias)
        K.gelu_bias_bwd(out, h, bias)

    qkv = r(N, T, 3 * D)

    def attn_bare(qkv):
        Dh = D // H
        q, k, v = (t.transpose(1, 2) for t in qkv.view(N, T, 3, H, Dh).unbind(2))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)

    def attn_bare_bwd(qkv):
        Dh = D // H
        q, k, v = (t.transpose(1, 2) for t in qkv.view(N, T, 3, H, Dh).unbind(2))
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            o, q, k, v, o, lse, 0.0, False, scale=Dh ** -0.5)

    img, w, b = r(N, 4, 4, 4), r(D, 4, 2, 2), r(D)
    pos = r(4, D)

    def pe_bare_bwd(img, w, b):
        out = K.patch_embed_fwd(img, w, b, pos, 2)
        K.patch_embed_bwd(out, img, w, 2, True, True, True)

    tok = r(N, 4, 16)
    t = torch.arange(N, dtype=torch.float32) * 7.0
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(128) / 128)
    return {
        "ln_modulate": (lambda x, s, c: ln_modulate(x, s, c, eps),
                        lambda x, s, c: K.ln_modulate_fwd(x, s, c, eps), (x, shift, scale),
                        ln_bare_bwd),
        "gated_residual_ln_modulate": (
            lambda *a: gated_residual_ln_modulate(*a, eps),
            lambda *a: K.gated_residual_ln_modulate_fwd(*a, eps), (x, y, gate, shift, scale),
            grln_bare_bwd),
        "gated_residual": (gated_residual, K.gated_residual_fwd, (x, y, gate), gr_bare_bwd),
        "gelu_bias": (gelu_bias, K.gelu_bias_fwd, (h, bias), gelu_bare_bwd),
        "attention": (lambda q: attention_qkv(q, H), attn_bare, (qkv,), attn_bare_bwd),
        "patch_embed": (lambda i, w, b: patch_embed(i, w, b, pos, 2),
                        lambda i, w, b: K.patch_embed_fwd(i, w, b, pos, 2), (img, w, b),
                        pe_bare_bwd),
        "unpatchify": (lambda y: unpatchify(y, 2, 4), lambda y: K.unpatchify_fwd(y, 2, 4, 2, 2),
                       (tok,), None),
        "timestep_embedding": (lambda t: timestep_embedding(t, 256),
                               lambda t: K.timestep_embedding_fwd(t, freqs, 256, torch.float32),
                               (t,), None),
    }


def per_call_us(fns, calls, repeats):
    """(median, min) microseconds per call of each fn over the timed blocks, timed in turns (the
    min is the less noisy figure on a shared machine)."""
    for f in fns:  # warm-up (first-use validation, caches, lazy imports)
        for _ in range(20):
            f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [(statistics.median(t), min(t)) for t in times]


def _row(pub, bare):
    return {"public_us": round(pub[0], 2), "bare_us": round(bare[0], 2),
            "overhead_us": round(pub[0] - bare[0], 2), "public_min_us": round(pub[1], 2),
            "bare_min_us": round(bare[1], 2), "overhead_min_us": round(pub[1] - bare[1], 2)}


def measure(calls, repeats):
    out = {}
    for name, (public, bare, inputs, bare_bwd) in cases().items():
        with torch.no_grad():
            row = {"no_grad": _row(*per_call_us([lambda: public(*inputs), lambda: bare(*inputs)],
                                                 calls, repeats))}
        if bare_bwd is not None:
            leaves = [t.detach().requires_grad_(True) for t in inputs]

            def fwd_bwd():
                for t in leaves:
                    t.grad = None
                res = public(*leaves)
                res = res if isinstance(res, tuple) else (res,)
                torch.autograd.backward(res, [o.detach() for o in res])

            row["fwd_bwd"] = _row(*per_call_us([fwd_bwd, lambda: bare_bwd(*inputs)],
                                               calls // 2 or 1, repeats))
        out[name] = row
        print(f"{name:27s} " + "  ".join(
            f"{k}: overhead {v['overhead_us']:6.1f} us (min {v['overhead_min_us']:6.1f}; public "
            f"{v['public_min_us']:.1f}, bare {v['bare_min_us']:.1f})" for k, v in row.items()),
            flush=True)
    return out


def measure_select(calls, repeats):
    """The dispatch decision alone: `_backends.select` per call, for the like tensors the ops
    pass (attention: the packed (N, T, 3, H, Dh) view, an op with per-input checks)."""
    x = torch.empty(1, 4, 64)
    probes = {"ln_modulate": x, "attention": torch.empty(1, 4, 192).view(1, 4, 3, 2, 32),
              "linear": x}
    out = {}
    for op, t in probes.items():
        (med, lo), = per_call_us([lambda: _backends.select(op, t)], calls * 5, repeats)
        out[op] = {"select_us": round(med, 3), "select_min_us": round(lo, 3)}
        print(f"select({op!r}): {med:.2f} us (min {lo:.2f})", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per timed block")
    ap.add_argument("--repeats", type=int, default=15, help="timed blocks (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: host cost only)")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None, help="write/merge results into this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if _backends._probe("cpu") is not None:
        raise SystemExit("bench/host_overhead.py: needs the CPU extension dit_fast._C")
    first = time.perf_counter()
    res = {"ops": None, "dit_fast": os.path.dirname(dit_fast.__file__),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "calls": args.calls, "repeats": args.repeats}
    res["ops"] = measure(args.calls, args.repeats)
    res["select"] = measure_select(args.calls, args.repeats)
    stats = getattr(_backends, "validation_stats", None)
    if stats is not None:  # the one-time cost of first-use validation (none on older checkouts)
        res["first_use_validation"] = stats()
        total = sum(s["seconds"] for s in res["first_use_validation"])
        print(f"first-use validation: {len(res['first_use_validation'])} (op, backend, dtype, "
              f"device) keys, {total * 1e3:.1f} ms in all (once per process)")
    res["wall_s"] = round(time.perf_counter() - first, 1)
    if args.out:
        data = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                data = json.load(f)
        data[args.label or "run"] = res
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.out} [{args.label or 'run'}]")


if __name__ == "__main__":
    main()
