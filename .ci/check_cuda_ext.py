"""CI (no GPU): dit_fast._C_cuda imports and registers a CUDA kernel for every native op it should.

Expected CUDA ops, read from the sources:
  * every `m.impl("name", ...)` in the TORCH_LIBRARY_IMPL(dit_fast, CUDA, ...) blocks of
    csrc/cuda/*.cpp (what the build must contain), and
  * every op the C++ library defines (`m.def("name(...)")` in csrc/*.cpp), except CPU_ONLY.
Each must have no CUDA kernel after importing dit_fast._C alone (so the check is not vacuous) and one
after importing dit_fast._C_cuda, and be reachable as torch.ops.dit_fast.<name>.
Exit status 1 with the list of problems otherwise.
"""
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# Native ops with no CUDA kernel by design.
CPU_ONLY = {
    "linear_fwd": "packed-weight GEMM for CPU inference (csrc/cpu/gemm.cpp)",
    "attention_fwd": "CUDA attention is flash-attn / Triton (dit_fast/ops/attention.py)",
    "taylor_forecast_": "a memory-bound sum: the Triton kernel serves GPUs (dit_fast/ops/forecast.py)",
}


def _defined_ops():
    names = set()
    for f in CSRC.glob("*.cpp"):
        names |= set(re.findall(r'm\.def\(\s*"(\w+)\(', f.read_text()))
    return names


def _cuda_impls():
    names = set()
    for f in (CSRC / "cuda").glob("*.cpp"):
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(dit_fast,\s*CUDA,\s*m\)\s*\{(.*?)\n\}", f.read_text(), re.S):
            names |= set(re.findall(r'm\.impl\(\s*"(\w+)"', block))
    return names


def _has_cuda_kernel(name):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dit_fast::{name}", "CUDA")


def main():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device available: {torch.cuda.is_available()}")
    defined, impls = _defined_ops(), _cuda_impls()
    expected = sorted(impls | (defined - set(CPU_ONLY)))
    problems = []
    if not impls:
        problems.append("no TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) registrations found in csrc/cuda/*.cpp")
    problems += [f"{n}: registered for CUDA in csrc/cuda but not defined in csrc/*.cpp"
                 for n in sorted(impls - defined)]

    import dit_fast._C  # noqa: F401  defines the schemas and the CPU kernels
    early = [n for n in expected if _has_cuda_kernel(n)]
    problems += [f"{n}: a CUDA kernel exists before dit_fast._C_cuda is imported" for n in early]

    import dit_fast._C_cuda  # noqa: F401
    print(f"imported {dit_fast._C_cuda.__file__}")
    for n in expected:
        if not hasattr(torch.ops.dit_fast, n):
            problems.append(f"torch.ops.dit_fast.{n} does not exist")
        elif not _has_cuda_kernel(n):
            problems.append(f"dit_fast::{n} has no CUDA kernel after importing dit_fast._C_cuda")
    for n, why in sorted(CPU_ONLY.items()):
        print(f"  cpu only: {n} ({why})")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"ok: {len(expected)} ops have CUDA kernels: {', '.join(expected)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
