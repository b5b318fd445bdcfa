"""Helpers shared by the Triton kernels of the embedding / sampler ops (patchify, adaln,
sampler_step).

Every kernel takes a ``GPU: tl.constexpr`` flag: True when compiled for a GPU, False under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors). It selects what the interpreter cannot run or runs
differently: libdevice math (accurate, full-range cos/sin/exp on the GPU; NumPy under the
interpreter), tensor-core dots on bf16/fp16 operands (the interpreter's bf16 dot is broken, so
operands are widened to fp32 there) and the bf16 rounding of stores (the interpreter truncates;
round-to-nearest-even is done with integer ops instead).
"""

import triton
import triton.language as tl


@triton.jit
def round_bf16(v):
    """float32 -> float32 rounded to the nearest bfloat16 (ties to even), NaN kept."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def cast_out(v, dtype: tl.constexpr, GPU: tl.constexpr):
    """float32 `v` cast to the storage dtype `dtype` with round-to-nearest-even."""
    if dtype == tl.bfloat16:
        if GPU:
            return v.to(tl.bfloat16)
        else:
            u = round_bf16(v).to(tl.uint32, bitcast=True)
            return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


# Device functions (compiled as part of the kernels that call them): no AOT_SPECS of their own
# (tests/test_triton_aot.py).
AOT_DEVICE_FUNCTIONS = (round_bf16, cast_out)


def on_gpu(t) -> bool:
    """The GPU constexpr for a launch on tensor `t` (False: interpreter on a CPU tensor)."""
    return t.device.type != "cpu"
