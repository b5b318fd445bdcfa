"""The absolute floor of the error rule "a kernel's error against a float64 truth is at most c times
another implementation's (PyTorch's SDPA, GEMM or eager ops) plus a floor", shared by the tests
that use it (test_attention, test_linear, test_ln_modulate, test_model_fused)."""

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps
TF32_EPS = 2.0 ** -10  # an fp32 operand cut to TF32's 10 mantissa bits (tensor cores truncate)


def error_floor(max_ref: float, dtype: torch.dtype, K: int, dot_eps: float = FP32_EPS) -> float:
    # floor = 2 * (eps(dtype) + sqrt(K) * dot_eps) * max|ref|: what a correct kernel's error can
    # reach whatever the baseline's (whose error moves with the CPU: AVX-512 SDPA / MKL are more
    # accurate than AVX2's), from a few roundings to `dtype` of values up to max|ref| (P, dS, the
    # output) plus sums of K products each off by dot_eps relative (fp32 accumulation, or TF32
    # operands), whose errors add like a random walk (sqrt(K)). The factor 2 is twice the largest
    # error measured for our kernels (fp32, K = 64..130, AVX2 and AVX-512: 1.0 x the rest).
    return 2.0 * (torch.finfo(dtype).eps + math.sqrt(max(K, 1)) * dot_eps) * max_ref
