// Device-side storage <-> accumulator conversions for the embedding / sampler CUDA kernels
// (explicit conversion intrinsics only, so it compiles under torch's -D__CUDA_NO_*_CONVERSIONS__).
#pragma once

#include <cstdint>

#include "cuda/elem_common.cuh"

namespace dit_fast {
namespace cuda {
namespace embed {

// The storage <-> accumulator conversions of the element-wise kernels (elem_common.cuh).
using elem::Io;

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
