// Torch-free CUDA launchers of the embedding / sampler ops: the patch embedding (one GEMM over
// patches, bias + pos_embed in the epilogue) and its backward, unpatchify, the sinusoidal
// timestep embedding and the fused sampler step. Same layouts and semantics as the CPU kernels
// (csrc/cpu/patchify.h, timestep_embed.h, sampler_step.h); device pointers; runs on `stream`.
// Storage dtypes: float32, float16, bfloat16 (math in fp32) and float64 (math in fp64).
// Returns cudaSuccess, cudaErrorInvalidValue (bad sizes), cudaErrorNotSupported (dtype), or the
// launch error.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace dit_fast {
namespace cuda {

cudaError_t patch_embed_fwd(DType dtype, const void* x, const void* weight, const void* bias,
                            const void* pos, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                            int64_t p, int64_t D, cudaStream_t stream);

// Device workspace (bytes) patch_embed_bwd needs for these sizes (split-M partial sums of dweight).
size_t patch_embed_bwd_workspace_bytes(DType dtype, int64_t N, int64_t C, int64_t H, int64_t W,
                                       int64_t p, int64_t D);

// Any of dx, dweight, dbias may be null (not computed). `workspace`: at least
// patch_embed_bwd_workspace_bytes(...) bytes of device memory (may be null when that is 0).
cudaError_t patch_embed_bwd(DType dtype, const void* dout, const void* x, const void* weight,
                            void* dx, void* dweight, void* dbias, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t p, int64_t D, void* workspace, cudaStream_t stream);

// elem_size: 2, 4 or 8 bytes.
cudaError_t unpatchify_fwd(int elem_size, const void* y, void* img, int64_t N, int64_t Co,
                           int64_t Hg, int64_t Wg, int64_t p, cudaStream_t stream);
cudaError_t unpatchify_bwd(int elem_size, const void* dimg, void* dy, int64_t N, int64_t Co,
                           int64_t Hg, int64_t Wg, int64_t p, cudaStream_t stream);

// t_dtype: 0 float32, 1 float64, 2 int32, 3 int64.
cudaError_t timestep_embedding(int t_dtype, const void* t, int64_t t_stride, const float* freqs,
                               DType out_dtype, void* out, int64_t N, int64_t dim,
                               cudaStream_t stream);

cudaError_t sampler_step(int mode, DType m_dtype, const void* model_out, int64_t m_batch,
                         int64_t m_channels, DType x_dtype, const void* x, const void* noise,
                         const void* coefs, void* sample, void* pred_xstart, int64_t N, int64_t C,
                         int64_t S, bool clip, bool guided, double cfg_scale,
                         int64_t guide_channels, cudaStream_t stream);

}  // namespace cuda
}  // namespace dit_fast
