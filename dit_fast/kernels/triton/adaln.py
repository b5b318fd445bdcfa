"""Triton kernel: DiT's sinusoidal timestep embedding (TimestepEmbedder.timestep_embedding).

    args[n, i] = float32(t[n]) * freqs[i]                 (freqs: the official float32 table)
    out[n, :]  = [cos(args[n, :]), sin(args[n, :]), 0 if dim is odd]

One program per batch row. cos/sin are libdevice's full-range, accurate functions on the GPU
(NumPy's under the interpreter). The adaLN projection GEMM itself runs on cuBLAS / oneDNN through
torch (see dit_fast/ops/adaln.py).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._embed_common import cast_out, on_gpu
from ._launch import on_tensor_device


@triton.jit
def timestep_embedding_kernel(t_ptr, freqs_ptr, out_ptr, t_stride, half, dim,
                              ODD: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    tv = tl.load(t_ptr + n * t_stride).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    for i0 in range(0, half, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        ok = i < half
        f = tl.load(freqs_ptr + i, mask=ok, other=0.0)
        arg = tv * f
        if GPU:
            c = libdevice.cos(arg)
            s = libdevice.sin(arg)
        else:
            c = tl.cos(arg)
            s = tl.sin(arg)
        tl.store(out_ptr + n * dim + i, cast_out(c, out_ty, GPU), mask=ok)
        tl.store(out_ptr + n * dim + half + i, cast_out(s, out_ty, GPU), mask=ok)
    if ODD:
        tl.store(out_ptr + n * dim + dim - 1, cast_out(tl.zeros((), dtype=tl.float32), out_ty, GPU))


@on_tensor_device
def timestep_embedding(t, freqs, dim, dtype):
    """t (N,) float/int timesteps (any stride), freqs (dim // 2,) float32 -> (N, dim) `dtype`."""
    N = t.shape[0]
    out = torch.empty((N, dim), device=t.device, dtype=dtype)
    if N == 0 or dim == 0:
        return out
    half = dim // 2
    BLOCK = max(16, min(1024, triton.next_power_of_2(max(half, 1))))
    timestep_embedding_kernel[(N,)](t, freqs, out, t.stride(0), half, dim, ODD=bool(dim % 2),
                                    BLOCK=BLOCK, GPU=on_gpu(t))
    return out


def _spec(t_ty, out_ty):
    c = dict(ODD=False, BLOCK=128, GPU=True)
    sig = {"t_ptr": f"*{t_ty}", "freqs_ptr": "*fp32", "out_ptr": f"*{out_ty}", "t_stride": "i32",
           "half": "i32", "dim": "i32"}
    sig.update({k: "constexpr" for k in c})
    return (timestep_embedding_kernel, sig, c)


AOT_SPECS = [_spec("i64", "fp32"), _spec("i64", "bf16"), _spec("fp32", "fp32")]
