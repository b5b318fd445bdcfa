"""Per-dtype tolerances for comparing a backend's result with the float64 ground truth (used by the
tests, the selftest and the validation of kernels on first use).

Ground truth = the pure-PyTorch reference evaluated in float64 on the *same* (already rounded)
input values, so the tolerance only has to cover the kernel's own error: for reduced-precision
dtypes, one final rounding of an fp32-accurate result (bf16: 2^-9 relative, fp16: 2^-12 relative).
Kept in one place so every op's tests use the same numbers.
"""

import torch

# dtype: (atol, rtol) for forward outputs.
FWD = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}

# dtype: (atol, rtol) for gradients. Parameter gradients are sums over tokens, so their
# magnitude (and fp32 summation error) grows with T; the values below hold for T <= ~1000.
GRAD = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (4e-3, 4e-3),
}


def tol(dtype: torch.dtype, kind: str = "fwd") -> dict:
    """{"atol": ..., "rtol": ...} for `dtype`; kind is "fwd" or "grad"."""
    atol, rtol = {"fwd": FWD, "grad": GRAD}[kind][dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str = "fwd", msg: str = ""):
    """Compares `actual` (any dtype) with a float64 `expected`, using `actual.dtype`'s tolerance."""
    torch.testing.assert_close(actual.double(), expected.double(), **tol(actual.dtype, kind),
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
