// Torch-free CPU GEMM for DiT's Linear layers in inference, on a packed copy of the weight:
//   out (M, N) = x (M, K) @ W^T + bias            (epilogue kNone)
//   out (M, N) = gelu_tanh(x (M, K) @ W^T + bias) (epilogue kGelu: DiT's fc1 + act in one pass)
// W is an nn.Linear weight (N, K), row-major. `linear_pack` reorders it into the layout the
// micro-kernel streams (16-column panels, K in blocks of kKc): a K x N pass, about 1% of the
// GEMM at DiT's shapes, which dit_fast.ops.linear pays in every call (no cache to go stale).
//
// Design (BLIS-style): 6 x 16 fp32 register tile (12 accumulators); x is packed per thread in
// 6-row panels of up to kMc rows; OpenMP splits the M blocks. K is summed in blocks of kKc, the
// partial sums accumulating in `out` (so the rounding differs from MKL's, but the error stays
// within the same order: tests/test_linear.py holds it to <= 2x torch's own vs float64).
// AVX2+FMA micro-kernel where the CPU has it (cpu/isa.h), a scalar one otherwise; the GELU
// epilogue is cpu/gelu_avx2.h's (identical to the bias + GELU kernel) on AVX2, common/gelu.h's
// scalar formula on the generic path. float32 only. Results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

enum class Epilogue : int { kNone = 0, kGelu = 1 };

constexpr int64_t kGemmMr = 6, kGemmNr = 16, kGemmKc = 256, kGemmMc = 48;

// Floats in the packed copy of an (N, K) weight: K * round_up(N, 16).
int64_t linear_packed_numel(int64_t N, int64_t K);

// w (N, K) row-major -> packed (linear_packed_numel(N, K) floats).
Status linear_pack(const float* w, int64_t N, int64_t K, float* packed);

// out (M, N) (row stride ldo >= N) = epilogue(x (M, K) (row stride ldx >= K) @ W^T + bias), with
// W given by its packed copy; bias: (N) or nullptr. num_threads <= 0: OpenMP default.
Status linear_packed_fwd(const float* x, int64_t ldx, const float* packed, const float* bias,
                         float* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                         Epilogue epilogue, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
