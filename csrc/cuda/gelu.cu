// CUDA kernels for bias + GELU(tanh approximation). Torch-free: raw pointers + stream. Math shared
// with the CPU kernels through csrc/common/gelu.h (sigmoid form, one expf per element).
//
// Forward : element-wise, grid-stride; out may alias h (each element is read, then written, by
//           the same thread).
// Backward: one block per (32 columns, chunk of rows) computes dh for its tile and a partial
//           column sum of dh (as stored; float32, float64 for double) into the workspace; a
//           second kernel sums the partials of each column in a fixed order -> dbias
//           (deterministic, no atomics).
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/gelu.cu   (one line)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/gelu.h"
#include "cuda/elem_common.cuh"
#include "cuda/gelu_cuda.h"

namespace dit_fast {
namespace cuda {
namespace {

using elem::Io;

template <typename T>
__global__ void gelu_bias_fwd_kernel(const T* h, const T* __restrict__ bias, T* out, int64_t total,
                                     int64_t F) {
  using A = typename Io<T>::A;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const A v = Io<T>::load(h + i) + Io<T>::load(bias + i % F);
    Io<T>::store(out + i, gelu::forward<A>(v));
  }
}

// Rows per backward chunk: a multiple of kRowLanes; chosen from the shape only.
int64_t bwd_chunk_rows(int64_t M) {
  const int64_t target_chunks = 64;
  int64_t per = (M + target_chunks - 1) / target_chunks;
  per = (per + elem::kRowLanes - 1) / elem::kRowLanes * elem::kRowLanes;
  return per < 256 ? 256 : per;
}

// grid: (ceil(F / 32), chunks); block: (32, 8). part: (chunks, F) in the math type A.
template <typename T>
__global__ void gelu_bias_bwd_kernel(const T* dout, const T* __restrict__ h,
                                     const T* __restrict__ bias, T* dh,
                                     typename Io<T>::A* __restrict__ part, int64_t M, int64_t F,
                                     int64_t per_chunk) {
  using A = typename Io<T>::A;
  __shared__ A s_acc[elem::kRowLanes][elem::kColTile + 1];
  const int64_t f = static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per_chunk;
  const int64_t r1 = r0 + per_chunk < M ? r0 + per_chunk : M;
  A acc = A(0);
  if (f < F) {
    const A b = Io<T>::load(bias + f);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += elem::kRowLanes) {
      const int64_t i = r * F + f;
      const A g = Io<T>::load(dout + i) * gelu::grad<A>(Io<T>::load(h + i) + b);
      Io<T>::store(dh + i, g);
      acc += Io<T>::round(g);
    }
  }
  s_acc[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && f < F) {
    A tot = A(0);
#pragma unroll
    for (int k = 0; k < elem::kRowLanes; ++k) tot += s_acc[k][threadIdx.x];
    part[static_cast<int64_t>(blockIdx.y) * F + f] = tot;
  }
}

template <typename T>
__global__ void column_sum_kernel(const typename Io<T>::A* __restrict__ part, T* __restrict__ dbias,
                                  int64_t chunks, int64_t F) {
  using A = typename Io<T>::A;
  for (int64_t f = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; f < F;
       f += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A tot = A(0);
    for (int64_t c = 0; c < chunks; ++c) tot += part[c * F + f];
    Io<T>::store(dbias + f, tot);
  }
}

constexpr int kEltThreads = 256;

template <typename T>
cudaError_t launch_fwd(const void* h, const void* bias, void* out, int64_t M, int64_t F,
                       cudaStream_t stream) {
  const int64_t total = M * F;
  gelu_bias_fwd_kernel<T><<<elem::grid_for((total + kEltThreads - 1) / kEltThreads), kEltThreads,
                            0, stream>>>(static_cast<const T*>(h), static_cast<const T*>(bias),
                                         static_cast<T*>(out), total, F);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dout, const void* h, const void* bias, void* dh, void* dbias,
                       void* workspace, int64_t M, int64_t F, cudaStream_t stream) {
  const int64_t per = bwd_chunk_rows(M);
  const int64_t chunks = M > 0 ? (M + per - 1) / per : 0;
  using A = typename Io<T>::A;
  A* part = static_cast<A*>(workspace);
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>((F + elem::kColTile - 1) / elem::kColTile),
                    static_cast<unsigned>(chunks));
    gelu_bias_bwd_kernel<T><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
        static_cast<const T*>(dout), static_cast<const T*>(h), static_cast<const T*>(bias),
        static_cast<T*>(dh), part, M, F, per);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  column_sum_kernel<T><<<elem::grid_for((F + kEltThreads - 1) / kEltThreads), kEltThreads, 0,
                         stream>>>(part, static_cast<T*>(dbias), chunks, F);
  return cudaGetLastError();
}

template <typename Fn>
cudaError_t dispatch(DType dtype, Fn&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorNotSupported;
}

}  // namespace

cudaError_t gelu_bias_fwd(DType dtype, const void* h, const void* bias, void* out, int64_t M,
                          int64_t F, cudaStream_t stream) {
  if (M < 0 || F < 0) return cudaErrorInvalidValue;
  if (M == 0 || F == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return launch_fwd<decltype(tag)>(h, bias, out, M, F, stream);
  });
}

size_t gelu_bias_bwd_workspace_bytes(int64_t M, int64_t F) {
  if (M <= 0 || F <= 0) return 0;
  const int64_t per = bwd_chunk_rows(M);
  return static_cast<size_t>((M + per - 1) / per) * static_cast<size_t>(F) * sizeof(double);
}

cudaError_t gelu_bias_bwd(DType dtype, const void* dout, const void* h, const void* bias, void* dh,
                          void* dbias, void* workspace, int64_t M, int64_t F, cudaStream_t stream) {
  if (M < 0 || F < 0) return cudaErrorInvalidValue;
  if (F == 0) return cudaSuccess;
  if ((M + bwd_chunk_rows(M) - 1) / bwd_chunk_rows(M) > 65535) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) {
    return launch_bwd<decltype(tag)>(dout, h, bias, dh, dbias, workspace, M, F, stream);
  });
}

}  // namespace cuda
}  // namespace dit_fast
