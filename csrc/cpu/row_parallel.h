// Helpers shared by the CPU kernels: thread-count choice, accumulator types, row widening, and a
// deterministic "sum over token chunks" driver. Used by ln_modulate.cpp (also through
// ln_modulate_rows.h), gated_residual.cpp, gelu.cpp, attention.cpp, gemm.cpp and, through
// embed_common.h, the embedding / sampler kernels. Header-only, internal to csrc/cpu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/bf16.h"
#include "common/macros.h"

namespace dit_fast {
namespace cpu {
namespace rowpar {

// fp32 math for fp32/bf16 storage, fp64 for fp64.
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

// Below this many elements a kernel runs single-threaded (fork/join costs more than it saves).
constexpr int64_t kParallelMinElems = int64_t(1) << 15;

// Threads for a parallel region over `work_items` items touching `elems` elements in total:
// num_threads (<= 0: the OpenMP default), 1 below `min_parallel_elems`, never more than the items.
inline int resolve_threads(int num_threads, int64_t work_items, int64_t elems,
                           int64_t min_parallel_elems = kParallelMinElems) {
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

// ---- row load / store in the accumulator type (force-inlined into each ISA clone) ----------

// One element to / from the accumulator type (bf16 stores round to nearest even).
DIT_FORCEINLINE float to_acc(float v) { return v; }
DIT_FORCEINLINE double to_acc(double v) { return v; }
DIT_FORCEINLINE float to_acc(bf16 v) { return to_float(v); }
DIT_FORCEINLINE void from_acc(float v, float* dst) { *dst = v; }
DIT_FORCEINLINE void from_acc(double v, double* dst) { *dst = v; }
DIT_FORCEINLINE void from_acc(float v, bf16* dst) { *dst = to_bf16(v); }

DIT_FORCEINLINE void load_row(const bf16* src, float* dst, int64_t n) {
  DIT_OMP_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i].bits);
}
template <typename A>
DIT_FORCEINLINE void load_row(const A* src, A* dst, int64_t n) {
  DIT_OMP_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
DIT_FORCEINLINE void store_row(const float* src, bf16* dst, int64_t n) {
  DIT_OMP_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bf16_bits(src[i]);
}
template <typename A>
DIT_FORCEINLINE void store_row(const A* src, A* dst, int64_t n) {
  DIT_OMP_SIMD
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// The row in the accumulator type: `src` itself when no widening is needed, else `scratch`
// filled with the widened row.
template <typename T>
DIT_FORCEINLINE const acc_t<T>* widen(const T* src, acc_t<T>* scratch, int64_t n) {
  if constexpr (std::is_same<T, acc_t<T>>::value) {
    (void)scratch;
    (void)n;
    return src;
  } else {
    load_row(src, scratch, n);
    return scratch;
  }
}

// Stores `v` rounded to T; returns the stored value in the accumulator type (exact for bf16:
// later math then uses exactly what was stored).
DIT_FORCEINLINE float store_rounded(bf16* dst, float v) {
  const uint16_t b = float_to_bf16_bits(v);
  dst->bits = b;
  return bf16_bits_to_float(b);
}
template <typename A>
DIT_FORCEINLINE A store_rounded(A* dst, A v) {
  *dst = v;
  return v;
}

// ---- deterministic per-batch column sums over token chunks ----------------------------------
//
// Work items are (n, chunk of tokens); each fills K partial rows of D accumulators (pre-zeroed)
// via `chunk_fn(n, t0, t1, partials /* K * D */, scratch)`. The partials are then summed over
// chunks in a fixed order and handed to `store_fn(n, k, sums /* D */)`. The chunking depends only
// on (N, T), so results do not depend on the number of threads.

inline int64_t token_chunks_per_batch(int64_t N, int64_t T) {
  if (T <= 0) return 1;
  const int64_t want = (64 + N - 1) / std::max<int64_t>(N, 1);  // >= 64 work items in total
  const int64_t max_chunks = std::max<int64_t>((T + 7) / 8, 1);  // >= 8 tokens per chunk
  return std::max<int64_t>(1, std::min(want, max_chunks));
}

template <typename A, typename ChunkFn, typename StoreFn>
void token_chunk_reduce(int64_t N, int64_t T, int64_t D, int K, int64_t scratch_elems,
                        int num_threads, ChunkFn chunk_fn, StoreFn store_fn) {
  const int64_t C = token_chunks_per_batch(N, T);
  const int64_t chunk = T > 0 ? (T + C - 1) / C : 0;
  const int64_t items = N * C;
  const int64_t stride = static_cast<int64_t>(K) * D;
  std::unique_ptr<A[]> partial(new A[std::max<int64_t>(items * stride, 1)]);
  const int nt = resolve_threads(num_threads, items, N * T * D);
  scratch_elems = std::max<int64_t>(std::max(scratch_elems, D), 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::unique_ptr<A[]> scratch(new A[scratch_elems]);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / C, c = it % C;
      A* p = partial.get() + it * stride;
      std::fill(p, p + stride, A(0));
      const int64_t t0 = std::min(c * chunk, T), t1 = std::min(t0 + chunk, T);
      chunk_fn(n, t0, t1, p, scratch.get());
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t nk = 0; nk < N * K; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      A* acc = scratch.get();
      const A* p0 = partial.get() + n * C * stride + k * D;
      std::copy(p0, p0 + D, acc);
      for (int64_t c = 1; c < C; ++c) {
        const A* p = p0 + c * stride;
        DIT_OMP_SIMD
        for (int64_t d = 0; d < D; ++d) acc[d] += p[d];
      }
      store_fn(n, static_cast<int>(k), acc);
    }
  }
  (void)nt;
}

}  // namespace rowpar
}  // namespace cpu
}  // namespace dit_fast
