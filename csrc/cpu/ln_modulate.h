// Torch-free CPU kernels: LayerNorm (no affine) fused with adaLN modulation.
//
//   y[n, t, :] = LN(x[n, t, :]) * (1 + scale[n, :]) + shift[n, :]
//
// Layouts (element strides, not bytes):
//   x, y, dy, dx : (N, T, D) contiguous
//   shift, scale : (N, D), unit stride along D, row stride `*_row_stride` (>= D; e.g. 6*D for a
//                  chunk of DiT's adaLN_modulation output, so no copy is needed)
//   mean, rstd   : (N, T) contiguous, accumulator type (float for fp32/bf16, double for fp64)
//   dshift, dscale: (N, D) contiguous, same dtype as x
// Supported storage dtypes: float32, bfloat16 (math in fp32), float64 (math in fp64).
// num_threads <= 0 uses the OpenMP default. Results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status ln_modulate_fwd(DType dtype, const void* x, const void* shift, int64_t shift_row_stride,
                       const void* scale, int64_t scale_row_stride, void* y, void* mean, void* rstd,
                       int64_t N, int64_t T, int64_t D, double eps, int num_threads = 0);

Status ln_modulate_bwd(DType dtype, const void* dy, const void* x, const void* scale,
                       int64_t scale_row_stride, const void* mean, const void* rstd, void* dx,
                       void* dshift, void* dscale, int64_t N, int64_t T, int64_t D,
                       int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
