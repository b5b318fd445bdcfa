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

namespace dit_fast {
namespace cpu {
namespace embed {

// Accumulator type: float for float32 / bfloat16 storage, double for float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

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

// Threads for a parallel region over `work_items` items touching `elems` elements in total:
// num_threads (<= 0: the OpenMP default), 1 for small problems (fork/join costs more than it
// saves), never more than the number of items.
inline int resolve_threads(int num_threads, int64_t work_items, int64_t elems,
                           int64_t min_parallel_elems = int64_t(1) << 15) {
#ifdef _OPENMP
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (elems < min_parallel_elems) nt = 1;
  if (work_items < nt) nt = static_cast<int>(std::max<int64_t>(work_items, 1));
  return std::max(nt, 1);
#else
  (void)num_threads;
  (void)work_items;
  (void)elems;
  (void)min_parallel_elems;
  return 1;
#endif
}

}  // namespace embed
}  // namespace cpu
}  // namespace dit_fast
