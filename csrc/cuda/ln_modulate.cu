// CUDA kernels for the fused LayerNorm + adaLN modulation. Torch-free: raw pointers + stream.
// Row math is shared with the CPU kernel through csrc/common/ln_modulate.h; the row and column
// pieces with the fused gated residual through cuda/ln_modulate_rows.cuh.
//
// Rows move in 16-byte vectors when D, the pointers and the row strides allow it, else element by
// element.
// Forward  : one block per (n, t) row, each thread holding its part of the row in registers
//            (rows beyond 1024 * kRowSlots vectors are re-read): two block reductions (mean, then
//            the corrected second pass), then y is written.
// Backward : kernel 1, one block per row: dx (one block reduction: mean(g), mean(g * xhat)).
//            kernel 2, one block per (32 column vectors, n): dshift / dscale as column sums over
//            tokens.
// All reductions use a fixed order, so results are deterministic run to run.
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/ln_modulate.cu   (one line)
// and also under torch's -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ etc.
// (only explicit conversion intrinsics are used).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/ln_modulate.h"
#include "cuda/elem_common.cuh"
#include "cuda/ln_modulate_cuda.h"
#include "cuda/ln_modulate_rows.cuh"

namespace dit_fast {
namespace cuda {
namespace {

namespace lnm = ::dit_fast::ln_modulate;
using elem::Io;

// ---- forward ----------------------------------------------------------------------------

template <typename T, int V, bool kCached>
__global__ void ln_modulate_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                       int64_t shift_stride, const T* __restrict__ scale,
                                       int64_t scale_stride, T* __restrict__ y,
                                       typename Io<T>::A* __restrict__ mean_out,
                                       typename Io<T>::A* __restrict__ rstd_out, int64_t rows,
                                       int64_t Tn, int64_t D, typename Io<T>::A eps) {
  using A = typename Io<T>::A;
  __shared__ A red_a[32], red_b[64];
  const int64_t vecs = D / V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    ln_rows::Row<A, V, kCached> row;
    A s = A(0);
    elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
      A v[V];
      elem::load_vec<T, V>(xr + j * V, v);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s += v[i];
        if (kCached) row.v[k][i] = v[i];
      }
    });
    const int64_t n = r / Tn;
    ln_rows::forward<T, V, kCached>(row, xr, s, vecs, D, eps, shift + n * shift_stride,
                                    scale + n * scale_stride, y + r * D, mean_out + r, rstd_out + r,
                                    red_a, red_b);
    if (r + gridDim.x < rows) __syncthreads();  // red_a / red_b are reused by the next row
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename T, int V, bool kCached>
__global__ void ln_modulate_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                          const T* __restrict__ scale, int64_t scale_stride,
                                          const typename Io<T>::A* __restrict__ mean,
                                          const typename Io<T>::A* __restrict__ rstd,
                                          T* __restrict__ dx, int64_t rows, int64_t Tn,
                                          int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A red[64];
  const int64_t vecs = D / V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    const T* dyr = dy + r * D;
    const T* sc = scale + (r / Tn) * scale_stride;
    const A m = mean[r], rs = rstd[r];
    ln_rows::Row<A, V, kCached> xh_row, g_row;
    A mean_g, mean_gx;
    ln_rows::bwd_sums<T, V, kCached>(xr, dyr, sc, m, rs, vecs, D, xh_row, g_row, red, mean_g,
                                     mean_gx);
    T* dxr = dx + r * D;
    elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
      A xh[V], g[V];
      ln_rows::bwd_elems<T, V, kCached>(xr, dyr, sc, m, rs, xh_row, g_row, k, j, xh, g);
#pragma unroll
      for (int i = 0; i < V; ++i) g[i] = lnm::grad_x<A>(g[i], xh[i], rs, mean_g, mean_gx);
      elem::store_vec<T, V>(dxr + j * V, g);
    });
    if (r + gridDim.x < rows) __syncthreads();
  }
}

// ---- launchers --------------------------------------------------------------------------

// Calls f(V, kCached) for a row kernel over rows of D elements.
template <typename T, typename F>
cudaError_t with_row_config(int64_t D, bool vec, F&& f) {
  return elem::with_vec<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const int threads = elem::row_threads(D / V);
    if (elem::row_fits(D / V, threads)) return f(v, std::true_type{}, threads);
    return f(v, std::false_type{}, threads);
  });
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* shift, int64_t ss, const void* scale, int64_t cs,
                       void* y, void* mean, void* rstd, int64_t N, int64_t Tn, int64_t D,
                       double eps, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const bool vec = elem::vec16_ok<T>(D, {x, shift, scale, y}, {ss, cs});
  return with_row_config<T>(D, vec, [&](auto v, auto cached, int threads) {
    constexpr int V = decltype(v)::value;
    ln_modulate_fwd_kernel<T, V, decltype(cached)::value>
        <<<elem::grid_for(rows), threads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(shift), ss,
            static_cast<const T*>(scale), cs, static_cast<T*>(y), static_cast<A*>(mean),
            static_cast<A*>(rstd), rows, Tn, D, static_cast<A>(eps));
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* x, const void* scale, int64_t cs,
                       const void* mean, const void* rstd, void* dx, void* dshift, void* dscale,
                       int64_t N, int64_t Tn, int64_t D, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const bool vec = elem::vec16_ok<T>(D, {dy, x, scale, dx, dshift, dscale}, {cs});
  if (rows > 0) {
    const cudaError_t err = with_row_config<T>(D, vec, [&](auto v, auto cached, int threads) {
      constexpr int V = decltype(v)::value;
      ln_modulate_bwd_dx_kernel<T, V, decltype(cached)::value>
          <<<elem::grid_for(rows), threads, 0, stream>>>(
              static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(scale),
              cs, static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(dx),
              rows, Tn, D);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return elem::with_vec<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const dim3 grid(static_cast<unsigned>((D / V + elem::kColTile - 1) / elem::kColTile),
                    static_cast<unsigned>(N));
    ln_rows::dparams_kernel<T, V, false><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
        static_cast<const A*>(rstd), nullptr, nullptr, nullptr, static_cast<T*>(dshift),
        static_cast<T*>(dscale), Tn, D);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t ln_modulate_fwd(DType dtype, const void* x, const void* shift, int64_t shift_row_stride,
                            const void* scale, int64_t scale_row_stride, void* y, void* mean,
                            void* rstd, int64_t N, int64_t T, int64_t D, double eps,
                            cudaStream_t stream) {
  if (N < 0 || T < 0 || D < 0 || shift_row_stride < 0 || scale_row_stride < 0 || !(eps >= 0.0))
    return cudaErrorInvalidValue;
  if (N * T == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(x, shift, shift_row_stride, scale, scale_row_stride, y, mean, rstd,
                               N, T, D, eps, stream);
    case DType::kFloat64:
      return launch_fwd<double>(x, shift, shift_row_stride, scale, scale_row_stride, y, mean, rstd,
                                N, T, D, eps, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(x, shift, shift_row_stride, scale, scale_row_stride, y, mean, rstd,
                                N, T, D, eps, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(x, shift, shift_row_stride, scale, scale_row_stride, y,
                                       mean, rstd, N, T, D, eps, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t ln_modulate_bwd(DType dtype, const void* dy, const void* x, const void* scale,
                            int64_t scale_row_stride, const void* mean, const void* rstd, void* dx,
                            void* dshift, void* dscale, int64_t N, int64_t T, int64_t D,
                            cudaStream_t stream) {
  if (N < 0 || T < 0 || D < 0 || scale_row_stride < 0 || N > 65535)  // N: grid.y
    return cudaErrorInvalidValue;
  if (N * D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(dy, x, scale, scale_row_stride, mean, rstd, dx, dshift, dscale, N,
                               T, D, stream);
    case DType::kFloat64:
      return launch_bwd<double>(dy, x, scale, scale_row_stride, mean, rstd, dx, dshift, dscale, N,
                                T, D, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(dy, x, scale, scale_row_stride, mean, rstd, dx, dshift, dscale, N,
                                T, D, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(dy, x, scale, scale_row_stride, mean, rstd, dx, dshift,
                                       dscale, N, T, D, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace cuda
}  // namespace dit_fast
