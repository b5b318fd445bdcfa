// Torch-free CPU kernels: DiT's gated residual update, alone and fused with the next
// LayerNorm + adaLN modulation (math: common/gated_residual.h).
//
//   gated_residual_ln_modulate_fwd:  x_new = x + gate * y;  h = LN(x_new) * (1 + scale) + shift
//   gated_residual_fwd:              out   = x + gate * y
//
// Layouts (element strides):
//   x, y, x_new, h, out, dx_new, dh, dout, dx, dy : (N, T, D) contiguous
//   gate, shift, scale : (N, D), unit stride along D, row stride `*_rs` (any >= 0: chunks of
//                        DiT's (N, 6D) adaLN output are read in place; 0 broadcasts one row)
//   mean, rstd         : (N, T) contiguous, accumulator type (float; double for fp64)
//   dgate, dshift, dscale : (N, D) contiguous, same dtype as x
// x_new / out may alias x (in-place update); nothing else may alias. dx_new may be null (zero).
// Storage dtypes: float32, bfloat16 (math in fp32), float64 (math in fp64). For bf16 the
// LayerNorm is taken of x_new as stored (rounded to bf16).
// num_threads <= 0: OpenMP default. Results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status gated_residual_ln_modulate_fwd(DType dtype, const void* x, const void* y, const void* gate,
                                      int64_t gate_rs, const void* shift, int64_t shift_rs,
                                      const void* scale, int64_t scale_rs, void* x_new, void* h,
                                      void* mean, void* rstd, int64_t N, int64_t T, int64_t D,
                                      double eps, int num_threads = 0);

Status gated_residual_ln_modulate_bwd(DType dtype, const void* dx_new, const void* dh,
                                      const void* x_new, const void* y, const void* gate,
                                      int64_t gate_rs, const void* scale, int64_t scale_rs,
                                      const void* mean, const void* rstd, void* dx, void* dy,
                                      void* dgate, void* dshift, void* dscale, int64_t N,
                                      int64_t T, int64_t D, int num_threads = 0);

Status gated_residual_fwd(DType dtype, const void* x, const void* y, const void* gate,
                          int64_t gate_rs, void* out, int64_t N, int64_t T, int64_t D,
                          int num_threads = 0);

// dx = dout is not computed (the caller reuses dout).
Status gated_residual_bwd(DType dtype, const void* dout, const void* y, const void* gate,
                          int64_t gate_rs, void* dy, void* dgate, int64_t N, int64_t T, int64_t D,
                          int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
