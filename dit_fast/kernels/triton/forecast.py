"""Triton kernel: the Taylor forecast of a cached feature (dit_fast.ops.forecast; math as
csrc/cpu/forecast.h):

    out[m] = sum_{i < K} w[i] * factors[i, m]

factors (K, M) float32 contiguous, out (M,) float32 / bfloat16 / float16 contiguous, written in
place. Sum in float32 in order i = 0..K-1 (launched with enable_fp_fusion=False: a separate multiply
and add per term, like the reference), one rounding (to nearest even) to out's dtype. The K weights travel as a small
float32 tensor (K is a constexpr: one specialization per order). Grid: blocks of M.
"""

import torch
import triton
import triton.language as tl

from ._embed_common import cast_out, on_gpu

__all__ = ["taylor_forecast_", "AOT_SPECS"]


@triton.jit
def taylor_forecast_kernel(OUT, F, W, M, K: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M
    f = F + offs
    acc = tl.load(f, mask=ok, other=0.0) * tl.load(W)
    for i in tl.static_range(1, K):
        f += M  # factor i (pointer steps: no int32 product i * M)
        acc = acc + tl.load(f, mask=ok, other=0.0) * tl.load(W + i)
    tl.store(OUT + offs, cast_out(acc, OUT.dtype.element_ty, GPU), mask=ok)


def taylor_forecast_(out: torch.Tensor, factors: torch.Tensor, weights) -> None:
    """out (...) contiguous, factors (K, *out.shape) float32 contiguous, weights: K floats."""
    M = out.numel()
    if M == 0:
        return
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=out.device)
    BLOCK = max(16, min(1024, triton.next_power_of_2(M)))
    taylor_forecast_kernel[(triton.cdiv(M, BLOCK),)](out, factors, w, M, K=len(w), BLOCK=BLOCK,
                                                      GPU=on_gpu(out), enable_fp_fusion=False)


def _spec(out_ty, k):
    c = dict(K=k, BLOCK=1024, GPU=True)
    sig = {"OUT": f"*{out_ty}", "F": "*fp32", "W": "*fp32", "M": "i32"}
    sig.update({name: "constexpr" for name in c})
    return (taylor_forecast_kernel, sig, c)


AOT_SPECS = [_spec("fp32", 3), _spec("bf16", 2), _spec("fp16", 1)]
