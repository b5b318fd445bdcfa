// Small helpers shared by the CPU kernels of the embedding / sampler ops (patchify.cpp,
// timestep_embed.cpp, sampler_step.cpp): storage <-> accumulator conversion and thread counts.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/bf16.h"
#include "common/macros.h"
#include "cpu/row_parallel.h"

namespace dit_fast {
namespace cpu {
namespace embed {

using rowpar::acc_t;            // float for float32 / bfloat16 storage, double for float64
using rowpar::resolve_threads;  // the thread-count rule of every row-parallel CPU kernel

template <typename A>
DIT_FORCEINLINE A to_acc(float v) {
  return static_cast<A>(v);
}
template <typename A>
DIT_FORCEINLINE A to_acc(double v) {
  return static_cast<A>(v);
}
template <typename A>
DIT_FORCEINLINE A to_acc(bf16 v) {
  return static_cast<A>(bf16_bits_to_float(v.bits));
}

template <typename T>
DIT_FORCEINLINE T from_acc(float v) {
  if constexpr (std::is_same<T, bf16>::value) {
    return bf16{float_to_bf16_bits(v)};
  } else {
    return static_cast<T>(v);
  }
}
template <typename T>
DIT_FORCEINLINE T from_acc(double v) {
  static_assert(std::is_same<T, double>::value, "double accumulators store float64 only");
  return v;
}

}  // namespace embed
}  // namespace cpu
}  // namespace dit_fast
