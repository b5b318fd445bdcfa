// Torch-free CUDA launchers for bias + GELU(tanh) (csrc/cuda/gelu.cu); math in common/gelu.h.
// Layouts as csrc/cpu/gelu.h: h, out, dout, dh (M, F) contiguous (out may be h, dh may be dout);
// bias (F); dbias (F). Storage dtypes: float32, float16, bfloat16 (math in fp32), float64.
// The backward needs a device workspace of gelu_bias_bwd_workspace_bytes(M, F) bytes, 8-byte
// aligned (per-chunk column partial sums, reduced in a fixed order: deterministic); dbias is summed
// from dh as stored. Returns cudaSuccess, cudaErrorInvalidValue, cudaErrorNotSupported, or the launch error.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace dit_fast {
namespace cuda {

cudaError_t gelu_bias_fwd(DType dtype, const void* h, const void* bias, void* out, int64_t M,
                          int64_t F, cudaStream_t stream);

size_t gelu_bias_bwd_workspace_bytes(int64_t M, int64_t F);

cudaError_t gelu_bias_bwd(DType dtype, const void* dout, const void* h, const void* bias, void* dh,
                          void* dbias, void* workspace, int64_t M, int64_t F, cudaStream_t stream);

}  // namespace cuda
}  // namespace dit_fast
