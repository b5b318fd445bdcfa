"""Ahead-of-time compilation of the kernel modules' ``AOT_SPECS`` for a GPU architecture, without
a GPU, and what the compiled code says about a kernel (registers, spills, shared memory, tensor-
core vs FMA instructions). Used by tests/test_triton_aot.py and bench/triton_attention_aot.py.

A spec is ``(kernel, signature, constexprs)`` or ``(kernel, signature, constexprs, options)``;
options are compile options such as num_warps / num_stages, as the launcher passes them.
Compilation needs the real @triton.jit objects, i.e. TRITON_INTERPRET unset when the kernel
module is imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_spec(spec, arch: int):
    """The CompiledKernel of one spec for sm_`arch`."""
    fn, sig, consts, *rest = spec
    sig = dict(sig)
    for c in consts:
        sig.setdefault(c, "constexpr")
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=dict(consts)),
                          target=GPUTarget("cuda", arch, 32), options=dict(rest[0]) if rest else None)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spill bytes per thread: stack frame + local memory; a kernel that
    calls nothing has a stack frame only for spills) from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    return regs, sum(int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", text))


def kernel_stats(k) -> dict:
    """Launch shape and instruction mix of a compiled kernel. Counts are static PTX instructions:
    wgmma (sm_90 warpgroup MMA), mma (mma.sync, sm_80+), fma (fp32 fused multiply-adds)."""
    ptx = k.asm["ptx"]
    regs, spill = _resource_usage(k.asm["cubin"])
    count = lambda pat: len(re.findall(pat, ptx))  # noqa: E731
    return dict(num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                shared_bytes=k.metadata.shared, regs=regs, spill_bytes=spill,
                wgmma=count(r"\bwgmma\.mma_async\."), mma=count(r"\bmma\.sync\."),
                fma=count(r"\bfma\.rn\.f32\b"))
