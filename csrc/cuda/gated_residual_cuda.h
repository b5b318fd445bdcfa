// Torch-free CUDA launchers for the gated residual update, alone and fused with LayerNorm +
// adaLN modulation (csrc/cuda/gated_residual.cu). Same layouts and semantics as
// csrc/cpu/gated_residual.h (x_new / out may alias x; dx_new may be null); device pointers; runs
// on `stream`. Storage dtypes: float32, float16, bfloat16 (math in fp32), float64 (math in fp64).
// In the backward, dgate is summed from dx as stored (for reduced precision: the rounded dx, as
// unfused autograd would see it). Returns cudaSuccess, cudaErrorInvalidValue (bad sizes),
// cudaErrorNotSupported (dtype), or the launch error.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace dit_fast {
namespace cuda {

cudaError_t gated_residual_ln_modulate_fwd(DType dtype, const void* x, const void* y,
                                           const void* gate, int64_t gate_rs, const void* shift,
                                           int64_t shift_rs, const void* scale, int64_t scale_rs,
                                           void* x_new, void* h, void* mean, void* rstd, int64_t N,
                                           int64_t T, int64_t D, double eps, cudaStream_t stream);

cudaError_t gated_residual_ln_modulate_bwd(DType dtype, const void* dx_new, const void* dh,
                                           const void* x_new, const void* y, const void* gate,
                                           int64_t gate_rs, const void* scale, int64_t scale_rs,
                                           const void* mean, const void* rstd, void* dx, void* dy,
                                           void* dgate, void* dshift, void* dscale, int64_t N,
                                           int64_t T, int64_t D, cudaStream_t stream);

cudaError_t gated_residual_fwd(DType dtype, const void* x, const void* y, const void* gate,
                               int64_t gate_rs, void* out, int64_t N, int64_t T, int64_t D,
                               cudaStream_t stream);

cudaError_t gated_residual_bwd(DType dtype, const void* dout, const void* y, const void* gate,
                               int64_t gate_rs, void* dy, void* dgate, int64_t N, int64_t T,
                               int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace dit_fast
