"""The absolute floor of the error rule "a kernel's error against a float64 truth is at most k times
another implementation's (PyTorch's SDPA, GEMM or eager ops) plus a floor", shared by the tests
that use it (test_attention, test_linear, test_ln_modulate, test_model_fused)."""

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps
TF32_EPS = 2.0 ** -10  # an fp32 operand cut to TF32's 10 mantissa bits (tensor cores truncate)


def error_floor(max_ref: float, dtype: torch.dtype, K: int, c: float,
                dot_eps: float = FP32_EPS) -> float:
    # floor = c * (eps(dtype) + sqrt(K) * dot_eps) * max|ref|: the error a correct kernel may have
    # whatever the other implementation's (which moves with the CPU: AVX-512 SDPA / MKL can be
    # almost exact where AVX2's are not): a few roundings to `dtype` of values up to max|ref|
    # (P, dS, outputs), plus sums of K products each off by dot_eps relative (fp32 accumulation,
    # or TF32 operands), adding up like a random walk (sqrt(K)). Each test sets c to about twice
    # the largest error its kernels showed on their own, in these units.
    return c * (torch.finfo(dtype).eps + math.sqrt(max(K, 1)) * dot_eps) * max_ref
