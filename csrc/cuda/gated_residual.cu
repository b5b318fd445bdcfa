// CUDA kernels for the gated residual update, alone and fused with LayerNorm + adaLN modulation.
// Torch-free: raw pointers + stream. Row math shared with the CPU kernels through
// csrc/common/gated_residual.h and csrc/common/ln_modulate.h.
//
// Rows move in 16-byte vectors when D, the pointers and the row strides allow it, else element by
// element; no kernel divides an index per element.
// Fused forward : one block per (n, t) row: x_new = x + gate * y is written and (rounded to the
//                 storage type) held in registers (rows beyond 1024 * kRowSlots vectors are
//                 re-read), then the corrected two-pass mean / variance (two block reductions)
//                 and h. One read of x and y, one write of x_new and h.
// Fused backward: kernel 1, one block per row: dr = dx_new + LN-modulate backward (one block
//                 reduction), dx = dr, dy = gate * dr. Kernel 2, one block per (32 column
//                 vectors, n): dgate = sum_T dx * y, dshift = sum_T dh, dscale = sum_T dh * xhat.
// Plain         : out = x + gate * y, thread (x, y, z) = (column vector, tokens, n), gate loaded
//                 once per thread. Backward, one kernel per (32 column vectors, n): dy = gate *
//                 dout and dgate = sum_T dout * y from one read of dout and y.
// All reductions use a fixed order, so results are deterministic run to run.
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/gated_residual.cu   (one line)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/gated_residual.h"
#include "common/ln_modulate.h"
#include "cuda/elem_common.cuh"
#include "cuda/gated_residual_cuda.h"
#include "cuda/ln_modulate_rows.cuh"

namespace dit_fast {
namespace cuda {
namespace {

namespace lnm = ::dit_fast::ln_modulate;
namespace gr = ::dit_fast::gated_residual;
using elem::Io;

// ---- fused forward ----------------------------------------------------------------------------

template <typename T, int V, bool kCached>
__global__ void gr_ln_modulate_fwd_kernel(const T* x, const T* __restrict__ y,
                                          const T* __restrict__ gate, int64_t gate_rs,
                                          const T* __restrict__ shift, int64_t shift_rs,
                                          const T* __restrict__ scale, int64_t scale_rs,
                                          T* x_new, T* __restrict__ h,
                                          typename Io<T>::A* __restrict__ mean_out,
                                          typename Io<T>::A* __restrict__ rstd_out, int64_t rows,
                                          int64_t Tn, int64_t D, typename Io<T>::A eps) {
  // x_new may alias x (in-place update): every vector is read before it is written, by the same
  // thread, so x and x_new are not __restrict__.
  using A = typename Io<T>::A;
  __shared__ A red_a[32], red_b[64];
  const int64_t vecs = D / V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / Tn;
    const T* xr = x + r * D;
    const T* yr = y + r * D;
    const T* gt = gate + n * gate_rs;
    T* xo = x_new + r * D;
    // x_new (as stored) and its sum
    ln_rows::Row<A, V, kCached> row;
    A s = A(0);
    elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
      A xv[V], yv[V], gv[V];
      elem::load_vec<T, V>(xr + j * V, xv);
      elem::load_vec<T, V>(yr + j * V, yv);
      elem::load_vec<T, V>(gt + j * V, gv);
#pragma unroll
      for (int i = 0; i < V; ++i) xv[i] = gr::residual<A>(xv[i], gv[i], yv[i]);
      elem::store_vec<T, V, true>(xo + j * V, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s += xv[i];
        if (kCached) row.v[k][i] = xv[i];
      }
    });
    // without the cache, x_new is re-read from global memory (this thread wrote it)
    ln_rows::forward<T, V, kCached>(row, xo, s, vecs, D, eps, shift + n * shift_rs,
                                    scale + n * scale_rs, h + r * D, mean_out + r, rstd_out + r,
                                    red_a, red_b);
    if (r + gridDim.x < rows) __syncthreads();  // red_a / red_b are reused by the next row
  }
}

// ---- fused backward ---------------------------------------------------------------------------

template <typename T, int V, bool kCached>
__global__ void gr_ln_modulate_bwd_dx_kernel(const T* __restrict__ dx_new, const T* __restrict__ dh,
                                             const T* __restrict__ x_new, const T* __restrict__ gate,
                                             int64_t gate_rs, const T* __restrict__ scale,
                                             int64_t scale_rs,
                                             const typename Io<T>::A* __restrict__ mean,
                                             const typename Io<T>::A* __restrict__ rstd,
                                             T* __restrict__ dx, T* __restrict__ dy, int64_t rows,
                                             int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A red[64];
  const int64_t vecs = D / V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / Tn;
    const T* xr = x_new + r * D;
    const T* dhr = dh + r * D;
    const T* sc = scale + n * scale_rs;
    const T* gt = gate + n * gate_rs;
    const A m = mean[r], rs = rstd[r];
    ln_rows::Row<A, V, kCached> xh_row, g_row;
    A mean_g, mean_gx;
    ln_rows::bwd_sums<T, V, kCached>(xr, dhr, sc, m, rs, vecs, D, xh_row, g_row, red, mean_g,
                                     mean_gx);
    elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
      A xh[V], g[V], dr[V], gv[V];
      ln_rows::bwd_elems<T, V, kCached>(xr, dhr, sc, m, rs, xh_row, g_row, k, j, xh, g);
      if (dx_new != nullptr) {
        elem::load_vec<T, V>(dx_new + r * D + j * V, dr);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) dr[i] = A(0);
      }
      elem::load_vec<T, V>(gt + j * V, gv);
#pragma unroll
      for (int i = 0; i < V; ++i) dr[i] = gr::grad_residual<A>(dr[i], g[i], xh[i], rs, mean_g, mean_gx);
      elem::store_vec<T, V>(dx + r * D + j * V, dr);
#pragma unroll
      for (int i = 0; i < V; ++i) dr[i] = gr::grad_y<A>(gv[i], dr[i]);
      elem::store_vec<T, V>(dy + r * D + j * V, dr);
    });
    if (r + gridDim.x < rows) __syncthreads();
  }
}

// ---- plain --------------------------------------------------------------------------------------

// grid: (tiles_x, token tiles, N); block: (column vectors, tokens). out may alias x.
template <typename T, int V>
__global__ void gr_fwd_kernel(const T* x, const T* __restrict__ y, const T* __restrict__ gate,
                              int64_t gate_rs, T* out, int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c >= D) return;
  const int64_t n = blockIdx.z;
  A g[V];
  elem::load_vec<T, V>(gate + n * gate_rs + c, g);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; t < Tn; t += step) {
    const int64_t i = (n * Tn + t) * D + c;
    A xv[V], yv[V];
    elem::load_vec<T, V>(x + i, xv);
    elem::load_vec<T, V>(y + i, yv);
#pragma unroll
    for (int k = 0; k < V; ++k) xv[k] = gr::residual<A>(xv[k], g[k], yv[k]);
    elem::store_vec<T, V>(out + i, xv);
  }
}

// dy = gate * dout and dgate = sum_T dout * y. grid: (ceil(D / V / 32), N); block: (32, 8).
template <typename T, int V>
__global__ void gr_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                              const T* __restrict__ gate, int64_t gate_rs, T* __restrict__ dy,
                              T* __restrict__ dgate, int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A s_acc[elem::kRowLanes][V][elem::kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x) * V;
  A acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = A(0);
  if (c < D) {
    A g[V];
    elem::load_vec<T, V>(gate + n * gate_rs + c, g);
    for (int64_t t = threadIdx.y; t < Tn; t += elem::kRowLanes) {
      const int64_t i = (n * Tn + t) * D + c;
      A go[V], yv[V];
      elem::load_vec<T, V>(dout + i, go);
      elem::load_vec<T, V>(y + i, yv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc[k] += go[k] * yv[k];
        go[k] = gr::grad_y<A>(g[k], go[k]);
      }
      elem::store_vec<T, V>(dy + i, go);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) s_acc[threadIdx.y][k][threadIdx.x] = acc[k];
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    A tot[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      tot[k] = A(0);
#pragma unroll
      for (int l = 0; l < elem::kRowLanes; ++l) tot[k] += s_acc[l][k][threadIdx.x];
    }
    elem::store_vec<T, V>(dgate + n * D + c, tot);
  }
}

// ---- launchers ----------------------------------------------------------------------------------

// Calls f(V, kCached, threads) for a row kernel over rows of D elements.
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
cudaError_t launch_fused_fwd(const void* x, const void* y, const void* gate, int64_t grs,
                             const void* shift, int64_t srs, const void* scale, int64_t crs,
                             void* x_new, void* h, void* mean, void* rstd, int64_t N, int64_t Tn,
                             int64_t D, double eps, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const bool vec = elem::vec16_ok<T>(D, {x, y, gate, shift, scale, x_new, h}, {grs, srs, crs});
  return with_row_config<T>(D, vec, [&](auto v, auto cached, int threads) {
    constexpr int V = decltype(v)::value;
    gr_ln_modulate_fwd_kernel<T, V, decltype(cached)::value>
        <<<elem::grid_for(rows), threads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const T*>(y), static_cast<const T*>(gate), grs,
            static_cast<const T*>(shift), srs, static_cast<const T*>(scale), crs,
            static_cast<T*>(x_new), static_cast<T*>(h), static_cast<A*>(mean),
            static_cast<A*>(rstd), rows, Tn, D, static_cast<A>(eps));
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_fused_bwd(const void* dx_new, const void* dh, const void* x_new, const void* y,
                             const void* gate, int64_t grs, const void* scale, int64_t crs,
                             const void* mean, const void* rstd, void* dx, void* dy, void* dgate,
                             void* dshift, void* dscale, int64_t N, int64_t Tn, int64_t D,
                             cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const bool vec = elem::vec16_ok<T>(
      D, {dx_new, dh, x_new, y, gate, scale, dx, dy, dgate, dshift, dscale}, {grs, crs});
  if (rows > 0) {
    const cudaError_t e = with_row_config<T>(D, vec, [&](auto v, auto cached, int threads) {
      constexpr int V = decltype(v)::value;
      gr_ln_modulate_bwd_dx_kernel<T, V, decltype(cached)::value>
          <<<elem::grid_for(rows), threads, 0, stream>>>(
              static_cast<const T*>(dx_new), static_cast<const T*>(dh),
              static_cast<const T*>(x_new), static_cast<const T*>(gate), grs,
              static_cast<const T*>(scale), crs, static_cast<const A*>(mean),
              static_cast<const A*>(rstd), static_cast<T*>(dx), static_cast<T*>(dy), rows, Tn, D);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
  }
  return elem::with_vec<T>(vec, [&](auto v) {
    constexpr int V = decltype(v)::value;
    const dim3 grid(static_cast<unsigned>((D / V + elem::kColTile - 1) / elem::kColTile),
                    static_cast<unsigned>(N));
    ln_rows::dparams_kernel<T, V, true><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
        static_cast<const T*>(dh), static_cast<const T*>(x_new), static_cast<const A*>(mean),
        static_cast<const A*>(rstd), static_cast<const T*>(dx), static_cast<const T*>(y),
        static_cast<T*>(dgate), static_cast<T*>(dshift), static_cast<T*>(dscale), Tn, D);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_plain_fwd(const void* x, const void* y, const void* gate, int64_t grs, void* out,
                             int64_t N, int64_t Tn, int64_t D, cudaStream_t stream) {
  return elem::with_vec<T>(elem::vec16_ok<T>(D, {x, y, gate, out}, {grs}), [&](auto v) {
    constexpr int V = decltype(v)::value;
    const elem::ElemGeometry g = elem::elem_geometry(Tn, D / V, N);
    gr_fwd_kernel<T, V><<<dim3(g.tiles_x, g.row_tiles, static_cast<unsigned>(N)), g.block, 0,
                          stream>>>(static_cast<const T*>(x), static_cast<const T*>(y),
                                    static_cast<const T*>(gate), grs, static_cast<T*>(out), Tn, D);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_plain_bwd(const void* dout, const void* y, const void* gate, int64_t grs,
                             void* dy, void* dgate, int64_t N, int64_t Tn, int64_t D,
                             cudaStream_t stream) {
  return elem::with_vec<T>(elem::vec16_ok<T>(D, {dout, y, gate, dy, dgate}, {grs}), [&](auto v) {
    constexpr int V = decltype(v)::value;
    const dim3 grid(static_cast<unsigned>((D / V + elem::kColTile - 1) / elem::kColTile),
                    static_cast<unsigned>(N));
    gr_bwd_kernel<T, V><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
        static_cast<const T*>(dout), static_cast<const T*>(y), static_cast<const T*>(gate), grs,
        static_cast<T*>(dy), static_cast<T*>(dgate), Tn, D);
    return cudaGetLastError();
  });
}

bool bad_sizes(int64_t N, int64_t T, int64_t D, int64_t s1, int64_t s2, int64_t s3) {
  return N < 0 || T < 0 || D < 0 || s1 < 0 || s2 < 0 || s3 < 0 || N > 65535;  // N: grid.y / z
}

// Calls f(T{}) with the device storage type of `dtype`.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorNotSupported;
}

}  // namespace

cudaError_t gated_residual_ln_modulate_fwd(DType dtype, const void* x, const void* y,
                                           const void* gate, int64_t gate_rs, const void* shift,
                                           int64_t shift_rs, const void* scale, int64_t scale_rs,
                                           void* x_new, void* h, void* mean, void* rstd, int64_t N,
                                           int64_t T, int64_t D, double eps, cudaStream_t stream) {
  if (bad_sizes(N, T, D, gate_rs, shift_rs, scale_rs) || !(eps >= 0.0)) return cudaErrorInvalidValue;
  if (N * T == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return launch_fused_fwd<decltype(tag)>(x, y, gate, gate_rs, shift, shift_rs, scale, scale_rs,
                                           x_new, h, mean, rstd, N, T, D, eps, stream);
  });
}

cudaError_t gated_residual_ln_modulate_bwd(DType dtype, const void* dx_new, const void* dh,
                                           const void* x_new, const void* y, const void* gate,
                                           int64_t gate_rs, const void* scale, int64_t scale_rs,
                                           const void* mean, const void* rstd, void* dx, void* dy,
                                           void* dgate, void* dshift, void* dscale, int64_t N,
                                           int64_t T, int64_t D, cudaStream_t stream) {
  if (bad_sizes(N, T, D, gate_rs, scale_rs, 0)) return cudaErrorInvalidValue;
  if (N * D == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return launch_fused_bwd<decltype(tag)>(dx_new, dh, x_new, y, gate, gate_rs, scale, scale_rs,
                                           mean, rstd, dx, dy, dgate, dshift, dscale, N, T, D,
                                           stream);
  });
}

cudaError_t gated_residual_fwd(DType dtype, const void* x, const void* y, const void* gate,
                               int64_t gate_rs, void* out, int64_t N, int64_t T, int64_t D,
                               cudaStream_t stream) {
  if (bad_sizes(N, T, D, gate_rs, 0, 0)) return cudaErrorInvalidValue;
  if (N * T * D == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return launch_plain_fwd<decltype(tag)>(x, y, gate, gate_rs, out, N, T, D, stream);
  });
}

cudaError_t gated_residual_bwd(DType dtype, const void* dout, const void* y, const void* gate,
                               int64_t gate_rs, void* dy, void* dgate, int64_t N, int64_t T,
                               int64_t D, cudaStream_t stream) {
  if (bad_sizes(N, T, D, gate_rs, 0, 0)) return cudaErrorInvalidValue;
  if (N * D == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    return launch_plain_bwd<decltype(tag)>(dout, y, gate, gate_rs, dy, dgate, N, T, D, stream);
  });
}

}  // namespace cuda
}  // namespace dit_fast
