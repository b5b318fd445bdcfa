// Torch-free CUDA launchers for the fused LayerNorm + adaLN modulation (csrc/cuda/ln_modulate.cu).
// Same layouts and semantics as csrc/cpu/ln_modulate.h; device pointers; runs on `stream`.
// Storage dtypes: float32, float16, bfloat16 (math in fp32) and float64 (math in fp64).
// Returns cudaSuccess, cudaErrorInvalidValue (bad sizes), cudaErrorNotSupported (dtype), or the
// launch error.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace dit_fast {
namespace cuda {

cudaError_t ln_modulate_fwd(DType dtype, const void* x, const void* shift, int64_t shift_row_stride,
                            const void* scale, int64_t scale_row_stride, void* y, void* mean,
                            void* rstd, int64_t N, int64_t T, int64_t D, double eps,
                            cudaStream_t stream);

cudaError_t ln_modulate_bwd(DType dtype, const void* dy, const void* x, const void* scale,
                            int64_t scale_row_stride, const void* mean, const void* rstd, void* dx,
                            void* dshift, void* dscale, int64_t N, int64_t T, int64_t D,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace dit_fast
