// Device-side storage <-> accumulator conversions for the embedding / sampler CUDA kernels
// (explicit conversion intrinsics only, so it compiles under torch's -D__CUDA_NO_*_CONVERSIONS__).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dit_fast {
namespace cuda {
namespace embed {

template <typename T>
struct Io;
template <>
struct Io<float> {
  using A = float;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};
template <>
struct Io<double> {
  using A = double;
  static __device__ __forceinline__ double load(const double* p) { return *p; }
  static __device__ __forceinline__ void store(double* p, double v) { *p = v; }
  static __device__ __forceinline__ double round(double v) { return v; }
};
template <>
struct Io<__half> {
  using A = float;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) {
    return __half2float(__float2half_rn(v));
  }
};
template <>
struct Io<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ float round(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
};

// Rounding policy for common/sampler_step.h: round to storage type T, back to the accumulator.
template <typename T>
struct RoundTo {
  template <typename A>
  static __device__ __forceinline__ A r(A v) {
    return Io<T>::round(v);
  }
};

constexpr unsigned kMaxGrid = 1u << 30;

inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < static_cast<int64_t>(kMaxGrid) ? blocks : kMaxGrid);
}

}  // namespace embed
}  // namespace cuda
}  // namespace dit_fast
