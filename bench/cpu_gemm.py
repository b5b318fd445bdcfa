"""The packed-weight CPU GEMM (dit_fast.ops.linear) against torch's GEMM (F.linear) at DiT-S/2's
token-Linear shapes (batch 8, 256 px: 2048 rows), fp32, torch's thread count. Interleaved rounds in
one process, best of 5 rounds x 5 calls per shape (the steadier figure on a shared machine).

    python bench/cpu_gemm.py
"""
import time

import torch
import torch.nn.functional as F

from dit_fast import _backends
from dit_fast.ops.linear import packed_linear

SHAPES = ((2048, 384, 1152), (2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384))  # qkv, proj, fc1, fc2


def main():
    reason = _backends._probe("cpu")
    if reason is not None:
        raise SystemExit(f"the cpu backend cannot run: {reason}")
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; GFLOP/s (best of 5 rounds x 5 calls)")
    for M, K, N in SHAPES:
        x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
        fns = {"torch": lambda: F.linear(x, w, b), "packed": lambda: packed_linear(x, w, b)}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(5):
            for name, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - t0) / 5)
        gf = {k: 2 * M * K * N / v / 1e9 for k, v in best.items()}
        print(f"M={M} K={K} N={N}: torch {gf['torch']:.0f}, packed {gf['packed']:.0f} "
              f"({gf['packed'] / gf['torch']:.2f}x)")


if __name__ == "__main__":
    main()
