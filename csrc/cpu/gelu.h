// Torch-free CPU kernels: GELU (tanh approximation) fused with the preceding bias add,
//   out = gelu_tanh(h + bias)          (math: common/gelu.h)
//
// Layouts: h, out, dout, dh: (M, F) contiguous; bias: (F) contiguous; dbias: (F), dtype of h.
// `out` may be `h` (in place: the fc1 GEMM output is overwritten); `dh` may be `dout`.
// Storage dtypes: float32 and bfloat16 (math in fp32; AVX2 path with a vectorized exp, or the
// scalar generic path), float64 (math in fp64, scalar).
// num_threads <= 0: OpenMP default. Results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status gelu_bias_fwd(DType dtype, const void* h, const void* bias, void* out, int64_t M, int64_t F,
                     int num_threads = 0);

Status gelu_bias_bwd(DType dtype, const void* dout, const void* h, const void* bias, void* dh,
                     void* dbias, int64_t M, int64_t F, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
