// CUDA kernels for bias + GELU(tanh approximation). Torch-free: raw pointers + stream. Math shared
// with the CPU kernels through csrc/common/gelu.h (sigmoid form, one expf per element).
//
// Rows are read in 16-byte vectors (8 bf16 / fp16, 4 fp32, 2 fp64) when F and the pointers allow
// it, else element by element; there is no index division.
// Forward : thread (x, y) owns one vector of columns and loops over rows (elem::elem_geometry);
//           it loads its bias vector once. out may alias h (each vector is read, then written, by
//           the same thread).
// Backward: one block per (32 column vectors, chunk of rows) computes dh for its tile and a
//           partial column sum of dh (as stored; float32, float64 for double) into the workspace;
//           a second kernel sums the partials of each column in a fixed order -> dbias
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

// grid: (tiles_x, row tiles); block: (column vectors, rows).
template <typename T, int V>
__global__ void gelu_bias_fwd_kernel(const T* h, const T* __restrict__ bias, T* out, int64_t M,
                                     int64_t F) {
  using A = typename Io<T>::A;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= F) return;
  A b[V];
  elem::load_vec<T, V>(bias + c, b);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M; r += step) {
    A v[V];
    elem::load_vec<T, V>(h + r * F + c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = gelu::forward<A>(v[i] + b[i]);
    elem::store_vec<T, V>(out + r * F + c, v);
  }
}

// Rows per backward chunk: a multiple of kRowLanes; chosen from the shape only.
int64_t bwd_chunk_rows(int64_t M) {
  const int64_t target_chunks = 64;
  int64_t per = (M + target_chunks - 1) / target_chunks;
  per = (per + elem::kRowLanes - 1) / elem::kRowLanes * elem::kRowLanes;
  return per < 256 ? 256 : per;
}

// grid: (ceil(F / V / 32), chunks); block: (32, 8). part: (chunks, F) in the math type A.
template <typename T, int V>
__global__ void gelu_bias_bwd_kernel(const T* dout, const T* __restrict__ h,
                                     const T* __restrict__ bias, T* dh,
                                     typename Io<T>::A* __restrict__ part, int64_t M, int64_t F,
                                     int64_t per_chunk) {
  using A = typename Io<T>::A;
  __shared__ A s_acc[elem::kRowLanes][V][elem::kColTile + 1];
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x) * V;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * per_chunk;
  const int64_t r1 = r0 + per_chunk < M ? r0 + per_chunk : M;
  A acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = A(0);
  if (c < F) {
    A b[V];
    elem::load_vec<T, V>(bias + c, b);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += elem::kRowLanes) {
      A g[V], hv[V];
      elem::load_vec<T, V>(dout + r * F + c, g);
      elem::load_vec<T, V>(h + r * F + c, hv);
#pragma unroll
      for (int i = 0; i < V; ++i) g[i] *= gelu::grad<A>(hv[i] + b[i]);
      elem::store_vec<T, V, true>(dh + r * F + c, g);
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += g[i];
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) s_acc[threadIdx.y][i][threadIdx.x] = acc[i];
  __syncthreads();
  if (threadIdx.y == 0 && c < F) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      A tot = A(0);
#pragma unroll
      for (int k = 0; k < elem::kRowLanes; ++k) tot += s_acc[k][i][threadIdx.x];
      part[static_cast<int64_t>(blockIdx.y) * F + c + i] = tot;
    }
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
  return elem::with_vec<T>(elem::vec16_ok<T>(F, {h, bias, out}), [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const elem::ElemGeometry g = elem::elem_geometry(M, F / V);
    gelu_bias_fwd_kernel<T, V><<<dim3(g.tiles_x, g.row_tiles), g.block, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(bias), static_cast<T*>(out), M, F);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_bwd(const void* dout, const void* h, const void* bias, void* dh, void* dbias,
                       void* workspace, int64_t M, int64_t F, cudaStream_t stream) {
  const int64_t per = bwd_chunk_rows(M);
  const int64_t chunks = M > 0 ? (M + per - 1) / per : 0;
  using A = typename Io<T>::A;
  A* part = static_cast<A*>(workspace);
  if (chunks > 0) {
    const cudaError_t e =
        elem::with_vec<T>(elem::vec16_ok<T>(F, {dout, h, bias, dh}), [&](auto vec) {
          constexpr int V = decltype(vec)::value;
          const int64_t vecs = F / V;
          const dim3 grid(static_cast<unsigned>((vecs + elem::kColTile - 1) / elem::kColTile),
                          static_cast<unsigned>(chunks));
          gelu_bias_bwd_kernel<T, V><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
              static_cast<const T*>(dout), static_cast<const T*>(h), static_cast<const T*>(bias),
              static_cast<T*>(dh), part, M, F, per);
          return cudaGetLastError();
        });
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
