// CUDA kernels for the fused LayerNorm + adaLN modulation. Torch-free: raw pointers + stream.
// Row math is shared with the CPU kernel through csrc/common/ln_modulate.h.
//
// Forward  : one block per (n, t) row. The row is widened once into shared memory (when it fits),
//            mean and biased variance by a two-pass block reduction, then y is written.
// Backward : kernel 1, one block per row: dx (two block reductions: mean(g), mean(g * xhat)).
//            kernel 2, one block per (32 columns, n): dshift / dscale as column sums over tokens.
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
#include "cuda/ln_modulate_cuda.h"

namespace dit_fast {
namespace cuda {
namespace {

namespace lnm = ::dit_fast::ln_modulate;

// ---- storage <-> accumulator ----------------------------------------------------------------

template <typename T>
struct Io;
template <>
struct Io<float> {
  using A = float;
  static __device__ __forceinline__ A load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, A v) { *p = v; }
};
template <>
struct Io<double> {
  using A = double;
  static __device__ __forceinline__ A load(const double* p) { return *p; }
  static __device__ __forceinline__ void store(double* p, A v) { *p = v; }
};
template <>
struct Io<__half> {
  using A = float;
  static __device__ __forceinline__ A load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, A v) { *p = __float2half_rn(v); }
};
template <>
struct Io<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
    *p = __float2bfloat16_rn(v);
  }
};

// ---- block reduction (fixed order => deterministic) --------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums `v` over the block; every thread gets the result. `red` holds >= 32 elements.
// blockDim.x must be a multiple of 32.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < nwarps; ++w) total += red[w];
  __syncthreads();  // `red` may be reused right away
  return total;
}

// Sums two values over the block at once (one round of synchronization); `red` >= 64 elements.
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  A ta = A(0), tb = A(0);
  for (int w = 0; w < nwarps; ++w) {
    ta += red[w];
    tb += red[32 + w];
  }
  __syncthreads();
  a = ta;
  b = tb;
}

extern __shared__ __align__(16) unsigned char dit_dyn_smem[];

// ---- forward ----------------------------------------------------------------------------

template <typename T, bool kCacheRow>
__global__ void ln_modulate_fwd_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                       int64_t shift_stride, const T* __restrict__ scale,
                                       int64_t scale_stride, T* __restrict__ y,
                                       typename Io<T>::A* __restrict__ mean_out,
                                       typename Io<T>::A* __restrict__ rstd_out, int64_t rows,
                                       int64_t Tn, int64_t D, typename Io<T>::A eps) {
  using A = typename Io<T>::A;
  __shared__ A red[64];
  A* cache = reinterpret_cast<A*>(dit_dyn_smem);
  const A inv_d = D > 0 ? A(1) / static_cast<A>(D) : A(0);  // D == 0: mean 0, var 0 (as on CPU)
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    // pass 1: mean (each thread only ever touches its own columns of `cache`)
    A s = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A v = Io<T>::load(xr + d);
      if (kCacheRow) cache[d] = v;
      s += v;
    }
    const A m = block_sum(s, red) * inv_d;
    // pass 2: corrected two-pass (see common/ln_modulate.h): sums of c = x - m and c^2
    A sum_c = A(0), sum_c2 = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A c = (kCacheRow ? cache[d] : Io<T>::load(xr + d)) - m;
      sum_c += c;
      sum_c2 += c * c;
    }
    block_sum2(sum_c, sum_c2, red);
    A mean = A(0), var = A(0);
    if (D > 0) lnm::finish_mean_var<A>(m, sum_c, sum_c2, D, mean, var);
    const A rstd = lnm::rstd_from_var<A>(var, eps);
    if (threadIdx.x == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    // pass 3: normalize + modulate
    const int64_t n = r / Tn;
    const T* sh = shift + n * shift_stride;
    const T* sc = scale + n * scale_stride;
    T* yr = y + r * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A v = kCacheRow ? cache[d] : Io<T>::load(xr + d);
      Io<T>::store(yr + d,
                   lnm::forward_elem<A>(v, mean, rstd, Io<T>::load(sh + d), Io<T>::load(sc + d)));
    }
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename T>
__global__ void ln_modulate_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                          const T* __restrict__ scale, int64_t scale_stride,
                                          const typename Io<T>::A* __restrict__ mean,
                                          const typename Io<T>::A* __restrict__ rstd,
                                          T* __restrict__ dx, int64_t rows, int64_t Tn,
                                          int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A red[64];
  const A inv_d = A(1) / static_cast<A>(D);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * D;
    const T* dyr = dy + r * D;
    const T* sc = scale + (r / Tn) * scale_stride;
    const A m = mean[r], rs = rstd[r];
    A sg = A(0), sgx = A(0);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A xh = lnm::normalize<A>(Io<T>::load(xr + d), m, rs);
      const A g = lnm::grad_xhat<A>(Io<T>::load(dyr + d), Io<T>::load(sc + d));
      sg += g;
      sgx += g * xh;
    }
    block_sum2(sg, sgx, red);
    const A mean_g = sg * inv_d;
    const A mean_gx = sgx * inv_d;
    T* dxr = dx + r * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A xh = lnm::normalize<A>(Io<T>::load(xr + d), m, rs);
      const A g = lnm::grad_xhat<A>(Io<T>::load(dyr + d), Io<T>::load(sc + d));
      Io<T>::store(dxr + d, lnm::grad_x<A>(g, xh, rs, mean_g, mean_gx));
    }
  }
}

constexpr int kColTile = 32;   // columns per block (one warp wide => coalesced)
constexpr int kRowLanes = 8;   // token rows processed concurrently per block

// grid: (ceil(D / 32), N); block: (32, 8).
template <typename T>
__global__ void ln_modulate_bwd_dparams_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                               const typename Io<T>::A* __restrict__ mean,
                                               const typename Io<T>::A* __restrict__ rstd,
                                               T* __restrict__ dshift, T* __restrict__ dscale,
                                               int64_t Tn, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A s_shift[kRowLanes][kColTile + 1];
  __shared__ A s_scale[kRowLanes][kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  A acc_s = A(0), acc_c = A(0);
  if (d < D) {
    for (int64_t t = threadIdx.y; t < Tn; t += kRowLanes) {
      const int64_t row = n * Tn + t;
      const A g = Io<T>::load(dy + row * D + d);
      const A xh = lnm::normalize<A>(Io<T>::load(x + row * D + d), mean[row], rstd[row]);
      acc_s += g;
      acc_c += g * xh;
    }
  }
  s_shift[threadIdx.y][threadIdx.x] = acc_s;
  s_scale[threadIdx.y][threadIdx.x] = acc_c;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    A ts = A(0), tc = A(0);
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) {
      ts += s_shift[i][threadIdx.x];
      tc += s_scale[i][threadIdx.x];
    }
    Io<T>::store(dshift + n * D + d, ts);
    Io<T>::store(dscale + n * D + d, tc);
  }
}

// ---- launchers --------------------------------------------------------------------------

constexpr int64_t kMaxGrid = 1 << 30;
constexpr int64_t kMaxCachedRowBytes = 32 * 1024;  // stays under the 48 KiB default dyn. smem

int threads_for(int64_t D) {
  int t = 32;
  while (t < 256 && static_cast<int64_t>(t) * 8 < D) t *= 2;  // ~8+ elements per thread
  return t;
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* shift, int64_t ss, const void* scale, int64_t cs,
                       void* y, void* mean, void* rstd, int64_t N, int64_t Tn, int64_t D,
                       double eps, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  const int threads = threads_for(D);
  const unsigned grid = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(A));
  if (row_bytes <= kMaxCachedRowBytes) {
    ln_modulate_fwd_kernel<T, true><<<grid, threads, static_cast<size_t>(row_bytes), stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(shift), ss, static_cast<const T*>(scale),
        cs, static_cast<T*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), rows, Tn, D,
        static_cast<A>(eps));
  } else {
    ln_modulate_fwd_kernel<T, false><<<grid, threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(shift), ss, static_cast<const T*>(scale),
        cs, static_cast<T*>(y), static_cast<A*>(mean), static_cast<A*>(rstd), rows, Tn, D,
        static_cast<A>(eps));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* dy, const void* x, const void* scale, int64_t cs,
                       const void* mean, const void* rstd, void* dx, void* dshift, void* dscale,
                       int64_t N, int64_t Tn, int64_t D, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const int64_t rows = N * Tn;
  if (rows > 0) {
    const unsigned grid = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
    ln_modulate_bwd_dx_kernel<T><<<grid, threads_for(D), 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(scale), cs,
        static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(dx), rows, Tn,
        D);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (N > 65535) return cudaErrorInvalidValue;  // grid.y limit (far beyond DiT batch sizes)
  const dim3 grid2(static_cast<unsigned>((D + kColTile - 1) / kColTile), static_cast<unsigned>(N));
  const dim3 block2(kColTile, kRowLanes);
  ln_modulate_bwd_dparams_kernel<T><<<grid2, block2, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
      static_cast<const A*>(rstd), static_cast<T*>(dshift), static_cast<T*>(dscale), Tn, D);
  return cudaGetLastError();
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
  if (N < 0 || T < 0 || D < 0 || scale_row_stride < 0) return cudaErrorInvalidValue;
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
