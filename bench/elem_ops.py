"""Op-level timings of the element-wise / row fusions (gated residual + LayerNorm-modulate, bias +
GELU) against the unfused PyTorch expressions they replace, on the CPU.

    python bench/elem_ops.py                     # default shapes, 2 rounds x 15 timed turns
    python bench/elem_ops.py --threads 1 --turns 31

After warm-up, every case is timed in turns (ours, reference, ours, reference, ...), so drift on a
shared machine hits both alike; prints the median and the min over the turns (milliseconds) and
the median speedup. "ours" is the public op under use_backend("cpu"); "reference" is the plain
PyTorch code (what dit_fast.models.dit runs without the fusion).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dit_fast  # noqa: E402
from dit_fast.ops import (gated_residual, gated_residual_ln_modulate,  # noqa: E402
                          gated_residual_ln_modulate_ref, gated_residual_ref, gelu_bias,
                          gelu_bias_ref, linear_gelu, linear_gelu_ref)


def timed_turns(fns, turns, warmup=3):
    for f in fns:
        for _ in range(warmup):
            f()
    times = [[] for _ in fns]
    for _ in range(turns):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return times


def fwd_bwd(fn, inputs, grads):
    def run():
        for t in inputs:
            t.grad = None
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[:len(outs)])
    return run


def cases(dtype):
    g = torch.Generator().manual_seed(0)
    out = []
    # DiT-XL/2 block at 256 px: N = 2 images here, T = 256 tokens, D = 1152; DiT-S: D = 384, N = 8
    for N, T, D in ((2, 256, 1152), (8, 256, 384)):
        x, y = (torch.randn(N, T, D, generator=g).to(dtype) for _ in range(2))
        mod = (0.5 * torch.randn(N, 6 * D, generator=g)).to(dtype)
        gate, shift, scale = mod[:, 2 * D:3 * D], mod[:, 3 * D:4 * D], mod[:, 4 * D:5 * D]
        tag = f"N={N} T={T} D={D}"
        out.append((f"gated_residual_ln_modulate fwd {tag}",
                    lambda x=x, y=y, a=gate, b=shift, c=scale: gated_residual_ln_modulate(x, y, a, b, c),
                    lambda x=x, y=y, a=gate, b=shift, c=scale: gated_residual_ln_modulate_ref(x, y, a, b, c)))
        out.append((f"gated_residual fwd {tag}",
                    lambda x=x, y=y, a=gate: gated_residual(x, y, a),
                    lambda x=x, y=y, a=gate: gated_residual_ref(x, y, a)))
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, gate, shift, scale)]
        grads = [torch.randn(N, T, D, generator=g).to(dtype) for _ in range(2)]
        out.append((f"gated_residual_ln_modulate fwd+bwd {tag}",
                    fwd_bwd(gated_residual_ln_modulate, leaves, grads),
                    fwd_bwd(gated_residual_ln_modulate_ref, leaves, grads)))
    # fc1 epilogue: (N*T, 4D) = (2048, 1536) for DiT-S batch 8 ; DiT-XL batch 2: (512, 4608)
    for M, Fd in ((2048, 1536), (512, 4608)):
        h = torch.randn(M, Fd, generator=g).to(dtype)
        b = (0.5 * torch.randn(Fd, generator=g)).to(dtype)
        hh = h.clone()
        out.append((f"gelu_bias fwd ({M}, {Fd})", lambda h=h, b=b: gelu_bias(h, b),
                    lambda h=h, b=b: gelu_bias_ref(h, b)))
        out.append((f"gelu_bias fwd in place ({M}, {Fd})",
                    lambda hh=hh, b=b: torch.ops.dit_fast.gelu_bias_fwd_(hh, b),
                    lambda h=h, b=b: gelu_bias_ref(h, b)))
        leaves = [h.clone().requires_grad_(), b.clone().requires_grad_()]
        dout = [torch.randn(M, Fd, generator=g).to(dtype)]
        out.append((f"gelu_bias fwd+bwd ({M}, {Fd})", fwd_bwd(gelu_bias, leaves, dout),
                    fwd_bwd(gelu_bias_ref, leaves, dout)))
    x = torch.randn(8, 256, 384, generator=g).to(dtype)
    w = (torch.randn(1536, 384, generator=g) / 384 ** 0.5).to(dtype)
    b = torch.randn(1536, generator=g).to(dtype)
    out.append(("linear_gelu fwd x(8,256,384) W(1536,384)", lambda: linear_gelu(x, w, b),
                lambda: linear_gelu_ref(x, w, b)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--turns", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the whole table")
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dit_fast import _C
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU ISA {_C.cpu_isa()}")
    for rnd in range(args.rounds):
        for dname in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            print(f"\n# round {rnd + 1}, {dname}: median (min) ms over {args.turns} turns")
            print(f"{'case':52s} {'ours':>16s} {'reference':>16s} {'speedup':>8s}")
            for name, ours, ref in cases(dtype):
                with dit_fast.use_backend("cpu"), torch.no_grad() if "bwd" not in name else \
                        torch.enable_grad():
                    t_ours, t_ref = timed_turns([ours, ref], args.turns)
                mo, mr = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
                print(f"{name:52s} {mo:8.2f} ({min(t_ours) * 1e3:5.2f}) "
                      f"{mr:8.2f} ({min(t_ref) * 1e3:5.2f}) {mr / mo:7.2f}x")


if __name__ == "__main__":
    main()
