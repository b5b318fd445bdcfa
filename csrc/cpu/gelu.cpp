// CPU implementation of bias + GELU(tanh) (see gelu.h; math in common/gelu.h).
//
// AVX2 path (fp32 / bf16 storage): 8 elements at a time, bf16 widened / rounded in registers,
// exp from cpu/vec_avx2.h (~1.5 ulp), exact division for the sigmoid; row tails go through the
// same vector code on a zero-padded 8-element buffer, so every element gets identical math.
// Generic path (and fp64 everywhere): scalar loops over common/gelu.h with libm exp.
// Parallelism: OpenMP over rows; the backward's dbias is summed per row chunk (chunking depends
// only on M) and reduced in a fixed order, so results do not depend on the thread count.

#include "cpu/gelu.h"

#include <algorithm>
#include <memory>
#include <type_traits>

#include "common/bf16.h"
#include "common/gelu.h"
#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/row_parallel.h"
#include "cpu/gelu_avx2.h"
#include "cpu/vec_avx2.h"

namespace dit_fast {
namespace cpu {
namespace {

using rowpar::acc_t;
using rowpar::store_row;
using rowpar::widen;

struct Args {
  const void* h;
  const void* bias;
  const void* dout;  // backward only
  void* out;         // forward: out; backward: dh
  int64_t F;
};

// ---- generic (scalar) rows ----------------------------------------------------------------

// Rows [r0, r1). scratch: 2 * F accumulator elements [row | bias].
template <typename T>
DIT_FORCEINLINE void fwd_rows_generic_impl(const Args& a, int64_t r0, int64_t r1,
                                           acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t F = a.F;
  const A* b = widen(static_cast<const T*>(a.bias), scratch + F, F);
  for (int64_t r = r0; r < r1; ++r) {
    const A* hr = widen(static_cast<const T*>(a.h) + r * F, scratch, F);
    T* o = static_cast<T*>(a.out) + r * F;
    if constexpr (std::is_same<T, A>::value) {
      DIT_OMP_SIMD
      for (int64_t f = 0; f < F; ++f) o[f] = gelu::forward<A>(hr[f] + b[f]);
    } else {
      A* tmp = scratch;  // in place over the widened row
      DIT_OMP_SIMD
      for (int64_t f = 0; f < F; ++f) tmp[f] = gelu::forward<A>(hr[f] + b[f]);
      store_row(tmp, o, F);
    }
  }
}

// Rows [r0, r1); acc: F accumulators for dbias (pre-zeroed). scratch: 3 * F [h | dout | bias].
template <typename T>
DIT_FORCEINLINE void bwd_rows_generic_impl(const Args& a, int64_t r0, int64_t r1, acc_t<T>* acc,
                                           acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t F = a.F;
  const A* b = widen(static_cast<const T*>(a.bias), scratch + 2 * F, F);
  for (int64_t r = r0; r < r1; ++r) {
    const A* hr = widen(static_cast<const T*>(a.h) + r * F, scratch, F);
    const A* dr = widen(static_cast<const T*>(a.dout) + r * F, scratch + F, F);
    T* o = static_cast<T*>(a.out) + r * F;
    if constexpr (std::is_same<T, A>::value) {
      DIT_OMP_SIMD
      for (int64_t f = 0; f < F; ++f) {
        const A g = dr[f] * gelu::grad<A>(hr[f] + b[f]);
        acc[f] += g;
        o[f] = g;
      }
    } else {
      A* tmp = scratch;
      DIT_OMP_SIMD
      for (int64_t f = 0; f < F; ++f) {
        const A g = dr[f] * gelu::grad<A>(hr[f] + b[f]);
        acc[f] += g;
        tmp[f] = g;
      }
      store_row(tmp, o, F);
    }
  }
}

// ---- AVX2 rows (fp32 / bf16 storage) ------------------------------------------------------

#if DIT_CPU_HAVE_AVX2_PATH

#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))

// Widen / narrow up to 8 elements through a zero-padded fp32 buffer (row tails).
template <typename T>
DIT_AVX2_FI __m256 load_tail(const T* p, int64_t n) {
  alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same<T, bf16>::value) buf[i] = to_float(p[i]);
    else buf[i] = p[i];
  }
  return _mm256_load_ps(buf);
}
template <typename T>
DIT_AVX2_FI void store_tail(T* p, __m256 v, int64_t n) {
  alignas(32) T buf[8];
  avx2::store8(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

template <typename T>
DIT_AVX2_FI void fwd_rows_avx2_impl(const Args& a, int64_t r0, int64_t r1) {
  const int64_t F = a.F, F8 = F & ~int64_t(7);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const T* hr = static_cast<const T*>(a.h) + r * F;
    T* o = static_cast<T*>(a.out) + r * F;
    for (int64_t f = 0; f < F8; f += 8)
      avx2::store8(o + f, avx2::gelu8(_mm256_add_ps(avx2::load8(hr + f), avx2::load8(bias + f))));
    if (F8 < F) {
      const int64_t n = F - F8;
      store_tail(o + F8, avx2::gelu8(_mm256_add_ps(load_tail(hr + F8, n), load_tail(bias + F8, n))), n);
    }
  }
}

template <typename T>
DIT_AVX2_FI void bwd_rows_avx2_impl(const Args& a, int64_t r0, int64_t r1, float* acc) {
  const int64_t F = a.F, F8 = F & ~int64_t(7);
  const T* bias = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    const T* hr = static_cast<const T*>(a.h) + r * F;
    const T* dr = static_cast<const T*>(a.dout) + r * F;
    T* o = static_cast<T*>(a.out) + r * F;
    for (int64_t f = 0; f < F8; f += 8) {
      const __m256 v = _mm256_add_ps(avx2::load8(hr + f), avx2::load8(bias + f));
      const __m256 g = _mm256_mul_ps(avx2::load8(dr + f), avx2::grad8(v));
      _mm256_storeu_ps(acc + f, _mm256_add_ps(_mm256_loadu_ps(acc + f), g));
      avx2::store8(o + f, g);
    }
    if (F8 < F) {
      const int64_t n = F - F8;
      const __m256 v = _mm256_add_ps(load_tail(hr + F8, n), load_tail(bias + F8, n));
      const __m256 g = _mm256_mul_ps(load_tail(dr + F8, n), avx2::grad8(v));
      alignas(32) float gb[8];
      _mm256_store_ps(gb, g);
      for (int64_t i = 0; i < n; ++i) acc[F8 + i] += gb[i];
      store_tail(o + F8, g, n);
    }
  }
}

#undef DIT_AVX2_FI
#endif  // DIT_CPU_HAVE_AVX2_PATH

// ---- ISA clones ---------------------------------------------------------------------------

template <typename T>
using FwdFn = void (*)(const Args&, int64_t, int64_t, acc_t<T>*);
template <typename T>
using BwdFn = void (*)(const Args&, int64_t, int64_t, acc_t<T>*, acc_t<T>*);

template <typename T>
void fwd_rows_generic(const Args& a, int64_t r0, int64_t r1, acc_t<T>* s) {
  fwd_rows_generic_impl<T>(a, r0, r1, s);
}
template <typename T>
void bwd_rows_generic(const Args& a, int64_t r0, int64_t r1, acc_t<T>* acc, acc_t<T>* s) {
  bwd_rows_generic_impl<T>(a, r0, r1, acc, s);
}

#if DIT_CPU_HAVE_AVX2_PATH
template <typename T>
DIT_TARGET_AVX2 void fwd_rows_avx2(const Args& a, int64_t r0, int64_t r1, acc_t<T>* s) {
  if constexpr (std::is_same<T, double>::value) fwd_rows_generic_impl<T>(a, r0, r1, s);
  else fwd_rows_avx2_impl<T>(a, r0, r1);
}
template <typename T>
DIT_TARGET_AVX2 void bwd_rows_avx2(const Args& a, int64_t r0, int64_t r1, acc_t<T>* acc,
                                   acc_t<T>* s) {
  if constexpr (std::is_same<T, double>::value) bwd_rows_generic_impl<T>(a, r0, r1, acc, s);
  else bwd_rows_avx2_impl<T>(a, r0, r1, acc);
}
#endif

template <typename T>
FwdFn<T> pick_fwd() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &fwd_rows_avx2<T>;
#endif
  return &fwd_rows_generic<T>;
}
template <typename T>
BwdFn<T> pick_bwd() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &bwd_rows_avx2<T>;
#endif
  return &bwd_rows_generic<T>;
}

// ---- drivers ------------------------------------------------------------------------------

constexpr int64_t kFwdRowBlock = 4;  // rows per OpenMP work item in the forward

template <typename T>
void fwd_driver(const Args& a, int64_t M, int num_threads) {
  using A = acc_t<T>;
  const FwdFn<T> fn = pick_fwd<T>();
  const int64_t blocks = (M + kFwdRowBlock - 1) / kFwdRowBlock;
  const int nt = rowpar::resolve_threads(num_threads, blocks, M * a.F);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::unique_ptr<A[]> scratch(new A[std::max<int64_t>(2 * a.F, 1)]);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kFwdRowBlock;
      fn(a, r0, std::min(r0 + kFwdRowBlock, M), scratch.get());
    }
  }
  (void)nt;
}

template <typename T>
void bwd_driver(const Args& a, int64_t M, void* dbias, int num_threads) {
  using A = acc_t<T>;
  const BwdFn<T> fn = pick_bwd<T>();
  const int64_t F = a.F;
  T* out = static_cast<T*>(dbias);
  // Rows are "tokens" of a single batch entry: deterministic row chunks, fixed-order reduction.
  rowpar::token_chunk_reduce<A>(
      1, M, F, 1, 3 * F, num_threads,
      [&](int64_t, int64_t r0, int64_t r1, A* acc, A* s) { fn(a, r0, r1, acc, s); },
      [&](int64_t, int, const A* sums) { store_row(sums, out, F); });
}

}  // namespace

Status gelu_bias_fwd(DType dtype, const void* h, const void* bias, void* out, int64_t M, int64_t F,
                     int num_threads) {
  if (M < 0 || F < 0) return Status::kInvalidArgument;
  const Args a{h, bias, nullptr, out, F};
  const bool empty = M == 0 || F == 0;
  switch (dtype) {
    case DType::kFloat32: if (!empty) fwd_driver<float>(a, M, num_threads); return Status::kOk;
    case DType::kFloat64: if (!empty) fwd_driver<double>(a, M, num_threads); return Status::kOk;
    case DType::kBFloat16: if (!empty) fwd_driver<bf16>(a, M, num_threads); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

// With M == 0 (and F > 0) dbias is written as zeros.
Status gelu_bias_bwd(DType dtype, const void* dout, const void* h, const void* bias, void* dh,
                     void* dbias, int64_t M, int64_t F, int num_threads) {
  if (M < 0 || F < 0) return Status::kInvalidArgument;
  const Args a{h, bias, dout, dh, F};
  const bool empty = F == 0;
  switch (dtype) {
    case DType::kFloat32: if (!empty) bwd_driver<float>(a, M, dbias, num_threads); return Status::kOk;
    case DType::kFloat64: if (!empty) bwd_driver<double>(a, M, dbias, num_threads); return Status::kOk;
    case DType::kBFloat16: if (!empty) bwd_driver<bf16>(a, M, dbias, num_threads); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace cpu
}  // namespace dit_fast
