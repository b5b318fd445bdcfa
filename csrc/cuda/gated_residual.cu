// CUDA kernels for the gated residual update, alone and fused with LayerNorm + adaLN modulation.
// Torch-free: raw pointers + stream. Row math shared with the CPU kernels through
// csrc/common/gated_residual.h and csrc/common/ln_modulate.h.
//
// Fused forward : one block per (n, t) row: x_new = x + gate * y is written and (rounded to the
//                 storage type) cached in shared memory when the row fits, then the corrected
//                 two-pass mean / variance and h. One read of x and y, one write of x_new and h.
// Fused backward: kernel 1, one block per row: dr = dx_new + LN-modulate backward (two block
//                 reductions), dx = dr, dy = gate * dr. Kernel 2, one block per (32 columns, n):
//                 dgate = sum_T dx * y, dshift = sum_T dh, dscale = sum_T dh * xhat.
// Plain         : element-wise out = x + gate * y; backward dy = gate * dout element-wise and
//                 dgate = sum_T dout * y per (32 columns, n) block.
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

namespace dit_fast {
namespace cuda {
namespace {

namespace lnm = ::dit_fast::ln_modulate;
namespace gr = ::dit_fast::gated_residual;
using elem::Io;

extern __shared__ __align__(16) unsigned char dit_gr_smem[];

// ---- fused forward ----------------------------------------------------------------------------

template <typename T, bool kCacheRow>
__global__ void gr_ln_modulate_fwd_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                          const T* __restrict__ gate, int64_t gate_rs,
                                          const T* __restrict__ shift, int64_t shift_rs,
                                          const T* __restrict__ scale, int64_t scale_rs,
                                          T* x_new, T* __restrict__ h,
                                          typename Io<T>::A* __restrict__ mean_out,
                                          typename Io<T>::A* __restrict__ rstd_out, int64_t rows,
                                          int64_t Tn, int64_t D, typename Io<T>::A eps) {
  // x_new may alias x (in-place update): every element is read before it is written, by the
  // same thread, so x and x_new are not __restrict__.
  using A = typename Io<T>::A;
  __shared__ A red[64];
  A* cache = reinterpret_cast<A*>(dit_gr_smem);
  const A inv_d = D > 0 ? A(1) / static_cast<A>(D) : A(0);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / Tn;
    const T* xr = x + r * D;
    const T* yr = y + r * D;
    const T* gt = gate + n * gate_rs;
    T* xo = x_new + r * D;
    // pass 1: x_new (as stored), its sum
    A s = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A v = Io<T>::round(
          gr::residual<A>(Io<T>::load(xr + d), Io<T>::load(gt + d), Io<T>::load(yr + d)));
      Io<T>::store(xo + d, v);
      if (kCacheRow) cache[d] = v;
      s += v;
    }
    const A m = elem::block_sum(s, red) * inv_d;
    // pass 2: corrected two-pass statistics (common/ln_modulate.h); without the cache, x_new is
    // re-read from global memory (this thread wrote it).
    A sum_c = A(0), sum_c2 = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A c = (kCacheRow ? cache[d] : Io<T>::load(xo + d)) - m;
      sum_c += c;
      sum_c2 += c * c;
    }
    elem::block_sum2(sum_c, sum_c2, red);
    A mean = A(0), var = A(0);
    if (D > 0) lnm::finish_mean_var<A>(m, sum_c, sum_c2, D, mean, var);
    const A rstd = lnm::rstd_from_var<A>(var, eps);
    if (threadIdx.x == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    // pass 3: h
    const T* sh = shift + n * shift_rs;
    const T* sc = scale + n * scale_rs;
    T* hr = h + r * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A v = kCacheRow ? cache[d] : Io<T>::load(xo + d);
      Io<T>::store(hr + d,
                   lnm::forward_elem<A>(v, mean, rstd, Io<T>::load(sh + d), Io<T>::load(sc + d)));
    }
  }
}

// ---- fused backward ---------------------------------------------------------------------------

template <typename T>
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
  const A inv_d = A(1) / static_cast<A>(D);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t n = r / Tn;
    const T* xr = x_new + r * D;
    const T* dhr = dh + r * D;
    const T* sc = scale + n * scale_rs;
    const T* gt = gate + n * gate_rs;
    const A m = mean[r], rs = rstd[r];
    A sg = A(0), sgx = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A xh = lnm::normalize<A>(Io<T>::load(xr + d), m, rs);
      const A g = lnm::grad_xhat<A>(Io<T>::load(dhr + d), Io<T>::load(sc + d));
      sg += g;
      sgx += g * xh;
    }
    elem::block_sum2(sg, sgx, red);
    const A mean_g = sg * inv_d, mean_gx = sgx * inv_d;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A xh = lnm::normalize<A>(Io<T>::load(xr + d), m, rs);
      const A g = lnm::grad_xhat<A>(Io<T>::load(dhr + d), Io<T>::load(sc + d));
      const A dxn = dx_new != nullptr ? Io<T>::load(dx_new + r * D + d) : A(0);
      const A dr = gr::grad_residual<A>(dxn, g, xh, rs, mean_g, mean_gx);
      Io<T>::store(dx + r * D + d, dr);
      Io<T>::store(dy + r * D + d, gr::grad_y<A>(Io<T>::load(gt + d), dr));
    }
  }
}

// grid: (ceil(D / 32), N); block: (32, 8). dgate from dx as stored.
template <typename T>
__global__ void gr_ln_modulate_bwd_dparams_kernel(const T* __restrict__ dh,
                                                  const T* __restrict__ x_new,
                                                  const T* __restrict__ y, const T* __restrict__ dx,
                                                  const typename Io<T>::A* __restrict__ mean,
                                                  const typename Io<T>::A* __restrict__ rstd,
                                                  T* __restrict__ dgate, T* __restrict__ dshift,
                                                  T* __restrict__ dscale, int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A s_gate[elem::kRowLanes][elem::kColTile + 1];
  __shared__ A s_shift[elem::kRowLanes][elem::kColTile + 1];
  __shared__ A s_scale[elem::kRowLanes][elem::kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x;
  A acc_g = A(0), acc_s = A(0), acc_c = A(0);
  if (d < D) {
    for (int64_t t = threadIdx.y; t < Tn; t += elem::kRowLanes) {
      const int64_t row = n * Tn + t, i = row * D + d;
      const A g = Io<T>::load(dh + i);
      const A xh = lnm::normalize<A>(Io<T>::load(x_new + i), mean[row], rstd[row]);
      acc_g += Io<T>::load(dx + i) * Io<T>::load(y + i);
      acc_s += g;
      acc_c += g * xh;
    }
  }
  s_gate[threadIdx.y][threadIdx.x] = acc_g;
  s_shift[threadIdx.y][threadIdx.x] = acc_s;
  s_scale[threadIdx.y][threadIdx.x] = acc_c;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    A tg = A(0), ts = A(0), tc = A(0);
#pragma unroll
    for (int i = 0; i < elem::kRowLanes; ++i) {
      tg += s_gate[i][threadIdx.x];
      ts += s_shift[i][threadIdx.x];
      tc += s_scale[i][threadIdx.x];
    }
    Io<T>::store(dgate + n * D + d, tg);
    Io<T>::store(dshift + n * D + d, ts);
    Io<T>::store(dscale + n * D + d, tc);
  }
}

// ---- plain --------------------------------------------------------------------------------------

template <typename T>
__global__ void gr_fwd_kernel(const T* x, const T* __restrict__ y, const T* __restrict__ gate,
                              int64_t gate_rs, T* out, int64_t total, int64_t TD, int64_t D) {
  using A = typename Io<T>::A;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / TD, d = i % D;
    Io<T>::store(out + i, gr::residual<A>(Io<T>::load(x + i), Io<T>::load(gate + n * gate_rs + d),
                                          Io<T>::load(y + i)));
  }
}

template <typename T>
__global__ void gr_bwd_dy_kernel(const T* __restrict__ dout, const T* __restrict__ gate,
                                 int64_t gate_rs, T* __restrict__ dy, int64_t total, int64_t TD,
                                 int64_t D) {
  using A = typename Io<T>::A;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / TD, d = i % D;
    Io<T>::store(dy + i, gr::grad_y<A>(Io<T>::load(gate + n * gate_rs + d), Io<T>::load(dout + i)));
  }
}

// grid: (ceil(D / 32), N); block: (32, 8).
template <typename T>
__global__ void gr_bwd_dgate_kernel(const T* __restrict__ dout, const T* __restrict__ y,
                                    T* __restrict__ dgate, int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A s_acc[elem::kRowLanes][elem::kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x;
  A acc = A(0);
  if (d < D) {
    for (int64_t t = threadIdx.y; t < Tn; t += elem::kRowLanes) {
      const int64_t i = (n * Tn + t) * D + d;
      acc += Io<T>::load(dout + i) * Io<T>::load(y + i);
    }
  }
  s_acc[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    A tot = A(0);
#pragma unroll
    for (int i = 0; i < elem::kRowLanes; ++i) tot += s_acc[i][threadIdx.x];
    Io<T>::store(dgate + n * D + d, tot);
  }
}

// ---- launchers ----------------------------------------------------------------------------------

constexpr int64_t kMaxCachedRowBytes = 32 * 1024;  // stays under the 48 KiB default dyn. smem
constexpr int kEltThreads = 256;

template <typename T>
cudaError_t launch_fused_fwd(const void* x, const void* y, const void* gate, int64_t grs,
                             const void* shift, int64_t srs, const void* scale, int64_t crs,
                             void* x_new, void* h, void* mean, void* rstd, int64_t N, int64_t Tn,
                             int64_t D, double eps, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const int threads = elem::row_threads(D);
  const unsigned grid = elem::grid_for(rows);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(A));
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  const T* gp = static_cast<const T*>(gate);
  const T* sp = static_cast<const T*>(shift);
  const T* cp = static_cast<const T*>(scale);
  if (row_bytes <= kMaxCachedRowBytes) {
    gr_ln_modulate_fwd_kernel<T, true><<<grid, threads, static_cast<size_t>(row_bytes), stream>>>(
        xp, yp, gp, grs, sp, srs, cp, crs, static_cast<T*>(x_new), static_cast<T*>(h),
        static_cast<A*>(mean), static_cast<A*>(rstd), rows, Tn, D, static_cast<A>(eps));
  } else {
    gr_ln_modulate_fwd_kernel<T, false><<<grid, threads, 0, stream>>>(
        xp, yp, gp, grs, sp, srs, cp, crs, static_cast<T*>(x_new), static_cast<T*>(h),
        static_cast<A*>(mean), static_cast<A*>(rstd), rows, Tn, D, static_cast<A>(eps));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fused_bwd(const void* dx_new, const void* dh, const void* x_new, const void* y,
                             const void* gate, int64_t grs, const void* scale, int64_t crs,
                             const void* mean, const void* rstd, void* dx, void* dy, void* dgate,
                             void* dshift, void* dscale, int64_t N, int64_t Tn, int64_t D,
                             cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  if (rows > 0) {
    gr_ln_modulate_bwd_dx_kernel<T><<<elem::grid_for(rows), elem::row_threads(D), 0, stream>>>(
        static_cast<const T*>(dx_new), static_cast<const T*>(dh), static_cast<const T*>(x_new),
        static_cast<const T*>(gate), grs, static_cast<const T*>(scale), crs,
        static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(dx),
        static_cast<T*>(dy), rows, Tn, D);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>((D + elem::kColTile - 1) / elem::kColTile),
                  static_cast<unsigned>(N));
  gr_ln_modulate_bwd_dparams_kernel<T><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
      static_cast<const T*>(dh), static_cast<const T*>(x_new), static_cast<const T*>(y),
      static_cast<const T*>(dx), static_cast<const A*>(mean), static_cast<const A*>(rstd),
      static_cast<T*>(dgate), static_cast<T*>(dshift), static_cast<T*>(dscale), Tn, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_plain_fwd(const void* x, const void* y, const void* gate, int64_t grs, void* out,
                             int64_t N, int64_t Tn, int64_t D, cudaStream_t stream) {
  const int64_t total = N * Tn * D;
  gr_fwd_kernel<T><<<elem::grid_for((total + kEltThreads - 1) / kEltThreads), kEltThreads, 0,
                     stream>>>(static_cast<const T*>(x), static_cast<const T*>(y),
                               static_cast<const T*>(gate), grs, static_cast<T*>(out), total,
                               Tn * D, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_plain_bwd(const void* dout, const void* y, const void* gate, int64_t grs,
                             void* dy, void* dgate, int64_t N, int64_t Tn, int64_t D,
                             cudaStream_t stream) {
  const int64_t total = N * Tn * D;
  if (total > 0) {
    gr_bwd_dy_kernel<T><<<elem::grid_for((total + kEltThreads - 1) / kEltThreads), kEltThreads, 0,
                          stream>>>(static_cast<const T*>(dout), static_cast<const T*>(gate), grs,
                                    static_cast<T*>(dy), total, Tn * D, D);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(static_cast<unsigned>((D + elem::kColTile - 1) / elem::kColTile),
                  static_cast<unsigned>(N));
  gr_bwd_dgate_kernel<T><<<grid, dim3(elem::kColTile, elem::kRowLanes), 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(y), static_cast<T*>(dgate), Tn, D);
  return cudaGetLastError();
}

bool bad_sizes(int64_t N, int64_t T, int64_t D, int64_t s1, int64_t s2, int64_t s3) {
  return N < 0 || T < 0 || D < 0 || s1 < 0 || s2 < 0 || s3 < 0 || N > 65535;  // N: grid.y
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
