// Torch-free CPU GEMM for DiT's Linear layers in inference:
//   out (M, N) = x (M, K) @ W^T + bias            (epilogue kNone)
//   out (M, N) = gelu_tanh(x (M, K) @ W^T + bias) (epilogue kGelu: DiT's fc1 + act in one pass)
// W is an nn.Linear weight (N, K), row-major. Each call reorders it into the layout the
// micro-kernel streams (16-column panels, K in blocks of kKc; all threads share the K x N pass,
// about 1% of the GEMM at DiT's shapes) in a scratch buffer: there is no weight cache to go stale.
//
// Design (BLIS-style): 6 x 16 fp32 register tile (12 accumulators) reading x rows in place; each
// thread takes an equal share of the rows, in blocks of up to kMc rows. K is summed in blocks of
// kKc, the partial sums accumulating in the output (so the rounding differs from MKL's, but the
// error stays within the same order: tests/test_linear.py holds it to <= 2x torch's own vs
// float64). AVX2+FMA micro-kernel where the CPU has it (cpu/isa.h), a scalar one otherwise; the
// GELU epilogue is cpu/gelu_avx2.h's (identical to the bias + GELU kernel) on AVX2, common/gelu.h's
// scalar formula on the generic path. Results do not depend on the thread count.
// bfloat16 operands (a bf16 model on a CPU without bf16 dot products): the weight is widened while
// it is reordered and x row by row into a per-thread buffer, the sums stay float32 (each row block
// accumulates in a per-thread float32 buffer), and out is rounded to bf16 once, after the epilogue.
// So a bf16 Linear needs no bf16 <-> fp32 copies of its operands.
#pragma once

#include <cstdint>

#include "common/bf16.h"
#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

enum class Epilogue : int { kNone = 0, kGelu = 1 };

constexpr int64_t kGemmMr = 6, kGemmNr = 16, kGemmKc = 384, kGemmMc = 96;
// Up to this many rows (adaLN: one per sample) the weight is read in place, once, without
// reordering (a reorder would cost as much as the GEMM).
constexpr int64_t kGemmSmallM = 16;

// out (M, N) (row stride ldo >= N) = epilogue(x (M, K) (row stride ldx >= K) @ w^T + bias),
// w (N, K) contiguous; bias: (N) or nullptr. num_threads <= 0: OpenMP default.
Status linear_fwd(const float* x, int64_t ldx, const float* w, const float* bias, float* out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, Epilogue epilogue,
                  int num_threads = 0);
// The same with bf16 x, w, bias and out (float32 sums, one rounding of each output).
Status linear_fwd(const bf16* x, int64_t ldx, const bf16* w, const bf16* bias, bf16* out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, Epilogue epilogue,
                  int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
