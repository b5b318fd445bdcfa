// Torch-free CPU kernel: the Taylor forecast of a cached feature (dit_fast.ops.forecast,
// dit_fast.sampling.TaylorCache):
//
//   out[m] = sum_{i < K} w[i] * factors[i * M + m]
//
// factors (K, M) contiguous: the cached feature and its finite differences, float32 (float64 for
// float64 out); out (M,) contiguous, float32 / bfloat16 / float64, written in place. The sum runs
// in the factors' type, in order i = 0..K-1, each term one multiply and one add (no fused
// multiply-add, so every ISA and the PyTorch reference round alike), then one rounding to out.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

constexpr int64_t kForecastMaxFactors = 16;  // order <= 15

Status taylor_forecast(DType out_dtype, void* out, DType factor_dtype, const void* factors,
                       const double* weights, int64_t K, int64_t M, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
