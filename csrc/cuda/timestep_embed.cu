// CUDA kernel of DiT's sinusoidal timestep embedding (see common/timestep_embed.h): one thread per
// (n, i) pair writes cos and sin of float32(t[n]) * freqs[i]. cosf / sinf are CUDA's full-range
// accurate functions (not the __cosf / __sinf intrinsics). Torch-free.
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/timestep_embed.cu   (one line)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/timestep_embed.h"
#include "cuda/embed_cuda.h"
#include "cuda/embed_io.cuh"

namespace dit_fast {
namespace cuda {
namespace {

namespace te = ::dit_fast::timestep_embed;
using embed::Io;

template <typename Ti>
__device__ __forceinline__ float t_as_float(Ti v) {
  return static_cast<float>(v);  // round to nearest, like torch's t.float()
}

template <typename Ti, typename O>
__global__ void timestep_embedding_kernel(const Ti* __restrict__ t, int64_t t_stride,
                                          const float* __restrict__ freqs, O* __restrict__ out,
                                          int64_t N, int64_t half, int64_t dim) {
  const int64_t per_row = half > 0 ? half : 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < N * per_row;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / per_row, i = idx - n * per_row;
    O* row = out + n * dim;
    if (i < half) {
      float c, s;
      te::embed_pair(t_as_float(t[n * t_stride]), freqs[i], c, s);
      Io<O>::store(row + i, c);
      Io<O>::store(row + half + i, s);
    }
    if (i == 0 && (dim & 1)) Io<O>::store(row + dim - 1, 0.0f);
  }
}

template <typename Ti, typename O>
cudaError_t launch(const void* t, int64_t ts, const float* freqs, void* out, int64_t N,
                   int64_t dim, cudaStream_t stream) {
  const int64_t half = dim / 2;
  const int64_t work = N * (half > 0 ? half : 1);
  timestep_embedding_kernel<Ti, O><<<embed::grid_for(work, 256), 256, 0, stream>>>(
      static_cast<const Ti*>(t), ts, freqs, static_cast<O*>(out), N, half, dim);
  return cudaGetLastError();
}

template <typename O>
cudaError_t by_t(int t_dtype, const void* t, int64_t ts, const float* freqs, void* out, int64_t N,
                 int64_t dim, cudaStream_t stream) {
  switch (t_dtype) {
    case 0: return launch<float, O>(t, ts, freqs, out, N, dim, stream);
    case 1: return launch<double, O>(t, ts, freqs, out, N, dim, stream);
    case 2: return launch<int32_t, O>(t, ts, freqs, out, N, dim, stream);
    case 3: return launch<int64_t, O>(t, ts, freqs, out, N, dim, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace

cudaError_t timestep_embedding(int t_dtype, const void* t, int64_t t_stride, const float* freqs,
                               DType out_dtype, void* out, int64_t N, int64_t dim,
                               cudaStream_t stream) {
  if (N < 0 || dim < 0) return cudaErrorInvalidValue;
  if (N * dim == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kFloat32: return by_t<float>(t_dtype, t, t_stride, freqs, out, N, dim, stream);
    case DType::kFloat64: return by_t<double>(t_dtype, t, t_stride, freqs, out, N, dim, stream);
    case DType::kFloat16: return by_t<__half>(t_dtype, t, t_stride, freqs, out, N, dim, stream);
    case DType::kBFloat16:
      return by_t<__nv_bfloat16>(t_dtype, t, t_stride, freqs, out, N, dim, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace cuda
}  // namespace dit_fast
