// Device helpers shared by the element-wise / row CUDA kernels (gated_residual.cu, gelu.cu):
// storage <-> accumulator conversion and fixed-order (deterministic) block reductions.
// Only explicit conversion intrinsics are used, so the kernels also compile under torch's
// -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__ macros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dit_fast {
namespace cuda {
namespace elem {

// Io<T>: A is the math type (float, or double for double storage); round(v) = v rounded to T
// and widened back (what a store followed by a load gives).
template <typename T>
struct Io;
template <>
struct Io<float> {
  using A = float;
  static __device__ __forceinline__ A load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, A v) { *p = v; }
  static __device__ __forceinline__ A round(A v) { return v; }
};
template <>
struct Io<double> {
  using A = double;
  static __device__ __forceinline__ A load(const double* p) { return *p; }
  static __device__ __forceinline__ void store(double* p, A v) { *p = v; }
  static __device__ __forceinline__ A round(A v) { return v; }
};
template <>
struct Io<__half> {
  using A = float;
  static __device__ __forceinline__ A load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, A v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ A round(A v) { return __half2float(__float2half_rn(v)); }
};
template <>
struct Io<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
    *p = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ A round(A v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
};

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums `a` and `b` over the block (blockDim.x a multiple of 32, blockDim.y == 1) in a fixed order;
// every thread gets the totals. `red` holds >= 64 elements.
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
  __syncthreads();  // `red` may be reused right away
  a = ta;
  b = tb;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  A unused = A(0);
  block_sum2(v, unused, red);
  return v;
}

// Threads per block for one row of D elements: ~8+ elements per thread, 32..256.
inline int row_threads(int64_t D) {
  int t = 32;
  while (t < 256 && static_cast<int64_t>(t) * 8 < D) t *= 2;
  return t;
}

constexpr int64_t kMaxGrid = int64_t(1) << 30;

inline unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(items < 1 ? 1 : (items < kMaxGrid ? items : kMaxGrid));
}

// Column-sum tiles: 32 columns (one warp, coalesced) x kRowLanes rows per block.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

}  // namespace elem
}  // namespace cuda
}  // namespace dit_fast
