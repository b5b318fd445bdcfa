// CPU implementation of the fused LayerNorm + adaLN modulation (see ln_modulate.h).
//
// Parallelism: OpenMP over rows (forward) or over (n, token-chunk) work items (backward,
// rowpar::token_chunk_reduce).
// Vectorization: inner loops over D are `omp simd` loops on fp32/fp64 rows; bf16 rows are first
// widened into a per-thread fp32 scratch row. Every row routine is instantiated for the generic
// ISA and (on x86) for AVX2+FMA, selected at run time (cpu/isa.h).
// Determinism: the backward's token chunking depends only on the shape, and partial sums are
// reduced in a fixed order, so results are independent of the number of threads.

#include "cpu/ln_modulate.h"

#include <algorithm>
#include <memory>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/bf16.h"
#include "common/ln_modulate.h"
#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/ln_modulate_rows.h"
#include "cpu/row_parallel.h"

namespace dit_fast {
namespace cpu {
namespace {

namespace lnm = ::dit_fast::ln_modulate;

// Accumulator type, row widening/narrowing and the thread-count rule shared with the other
// row-parallel CPU kernels (cpu/row_parallel.h).
using rowpar::acc_t;
using rowpar::load_row;
using rowpar::resolve_threads;
using rowpar::store_row;
using rowpar::widen;

// ---- per-row / per-chunk routines (force-inlined into each ISA wrapper) --------------------

struct FwdArgs {
  const void* x;
  const void* shift;
  int64_t shift_stride;
  const void* scale;
  int64_t scale_stride;
  void* y;
  void* mean;
  void* rstd;
  int64_t T;
  int64_t D;
  double eps;
};

// Per-thread scratch: 3 * D accumulator elements (x row, shift row, scale row) and the batch
// index whose shift/scale rows are currently widened there (rows of one batch entry are
// consecutive, so reduced-precision shift/scale are widened once per batch entry, not per row).
struct Scratch {
  void* buf;
  int64_t cached_n;
};

template <typename T>
DIT_FORCEINLINE void fwd_row_impl(const FwdArgs& a, int64_t row, Scratch& s) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  const int64_t n = row / a.T;
  A* scratch = static_cast<A*>(s.buf);
  const A* xr = widen(static_cast<const T*>(a.x) + row * D, scratch, D);
  const A* sh;
  const A* sc;
  if constexpr (std::is_same<T, A>::value) {
    sh = static_cast<const T*>(a.shift) + n * a.shift_stride;
    sc = static_cast<const T*>(a.scale) + n * a.scale_stride;
  } else {
    if (s.cached_n != n) {
      load_row(static_cast<const T*>(a.shift) + n * a.shift_stride, scratch + D, D);
      load_row(static_cast<const T*>(a.scale) + n * a.scale_stride, scratch + 2 * D, D);
      s.cached_n = n;
    }
    sh = scratch + D;
    sc = scratch + 2 * D;
  }

  lnm_rows::forward<T, A>(xr, sh, sc, D, static_cast<A>(a.eps), static_cast<T*>(a.y) + row * D,
                          static_cast<A*>(a.mean) + row, static_cast<A*>(a.rstd) + row);
}

struct BwdArgs {
  const void* dy;
  const void* x;
  const void* scale;
  int64_t scale_stride;
  const void* mean;
  const void* rstd;
  void* dx;
  int64_t T;
  int64_t D;
};

// Rows t in [t0, t1) of batch n: writes dx, accumulates sum_t dy into acc_dshift and
// sum_t dy * xhat into acc_dscale (both D accumulator elements, pre-zeroed by the caller).
// scratch: 3 * D accumulator elements.
template <typename T>
DIT_FORCEINLINE void bwd_chunk_impl(const BwdArgs& a, int64_t n, int64_t t0, int64_t t1,
                                    acc_t<T>* acc_dshift, acc_t<T>* acc_dscale, void* scratch_v) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  A* scratch = static_cast<A*>(scratch_v);
  const A* sc = widen(static_cast<const T*>(a.scale) + n * a.scale_stride, scratch + 2 * D, D);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = n * a.T + t;
    const A* xr = widen(static_cast<const T*>(a.x) + row * D, scratch, D);
    const A* dyr = widen(static_cast<const T*>(a.dy) + row * D, scratch + D, D);
    const A mean = static_cast<const A*>(a.mean)[row];
    const A rstd = static_cast<const A*>(a.rstd)[row];

    A mean_g, mean_gx;
    lnm_rows::backward_sums<A>(xr, dyr, sc, mean, rstd, D, acc_dshift, acc_dscale, mean_g, mean_gx);

    T* dxr = static_cast<T*>(a.dx) + row * D;
    if constexpr (std::is_same<T, A>::value) {
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        const A xh = lnm::normalize<A>(xr[d], mean, rstd);
        dxr[d] = lnm::grad_x<A>(lnm::grad_xhat<A>(dyr[d], sc[d]), xh, rstd, mean_g, mean_gx);
      }
    } else {
      A* out = scratch + D;  // in place over the widened dy row
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        const A xh = lnm::normalize<A>(xr[d], mean, rstd);
        out[d] = lnm::grad_x<A>(lnm::grad_xhat<A>(dyr[d], sc[d]), xh, rstd, mean_g, mean_gx);
      }
      store_row(out, dxr, D);
    }
  }
}

// ---- ISA clones ---------------------------------------------------------------------------

template <typename T>
using FwdRowFn = void (*)(const FwdArgs&, int64_t, Scratch&);
template <typename T>
using BwdChunkFn = void (*)(const BwdArgs&, int64_t, int64_t, int64_t, acc_t<T>*, acc_t<T>*,
                            void*);

template <typename T>
void fwd_row_generic(const FwdArgs& a, int64_t row, Scratch& s) {
  fwd_row_impl<T>(a, row, s);
}
template <typename T>
void bwd_chunk_generic(const BwdArgs& a, int64_t n, int64_t t0, int64_t t1, acc_t<T>* ds,
                       acc_t<T>* dc, void* s) {
  bwd_chunk_impl<T>(a, n, t0, t1, ds, dc, s);
}

#if DIT_CPU_HAVE_AVX2_PATH
template <typename T>
DIT_TARGET_AVX2 void fwd_row_avx2(const FwdArgs& a, int64_t row, Scratch& s) {
  fwd_row_impl<T>(a, row, s);
}
template <typename T>
DIT_TARGET_AVX2 void bwd_chunk_avx2(const BwdArgs& a, int64_t n, int64_t t0, int64_t t1,
                                    acc_t<T>* ds, acc_t<T>* dc, void* s) {
  bwd_chunk_impl<T>(a, n, t0, t1, ds, dc, s);
}
#endif

template <typename T>
FwdRowFn<T> pick_fwd() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &fwd_row_avx2<T>;
#endif
  return &fwd_row_generic<T>;
}
template <typename T>
BwdChunkFn<T> pick_bwd() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &bwd_chunk_avx2<T>;
#endif
  return &bwd_chunk_generic<T>;
}

// ---- drivers ------------------------------------------------------------------------------

template <typename T>
void fwd_driver(const FwdArgs& a, int64_t N, int num_threads) {
  using A = acc_t<T>;
  const int64_t rows = N * a.T;
  const FwdRowFn<T> fn = pick_fwd<T>();
  const int nt = resolve_threads(num_threads, rows, rows * a.D);
  const int64_t scratch_elems = std::max<int64_t>(3 * a.D, 1);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::unique_ptr<A[]> buf(new A[scratch_elems]);
    Scratch scratch{buf.get(), -1};
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) fn(a, r, scratch);
  }
  (void)nt;
}

// dx per row; dshift / dscale as per-chunk partial sums over tokens, reduced in a fixed order
// (rowpar::token_chunk_reduce).
template <typename T>
void bwd_driver(const BwdArgs& a, int64_t N, T* dshift, T* dscale, int num_threads) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  const BwdChunkFn<T> fn = pick_bwd<T>();
  T* const outs[2] = {dshift, dscale};
  rowpar::token_chunk_reduce<A>(
      N, a.T, D, 2, 3 * D, num_threads,
      [&](int64_t n, int64_t t0, int64_t t1, A* acc, A* s) { fn(a, n, t0, t1, acc, acc + D, s); },
      [&](int64_t n, int k, const A* sums) { store_row(sums, outs[k] + n * D, D); });
}

bool valid_sizes(int64_t N, int64_t T, int64_t D, int64_t s1, int64_t s2) {
  return N >= 0 && T >= 0 && D >= 0 && s1 >= 0 && s2 >= 0;
}

}  // namespace

Status ln_modulate_fwd(DType dtype, const void* x, const void* shift, int64_t shift_row_stride,
                       const void* scale, int64_t scale_row_stride, void* y, void* mean, void* rstd,
                       int64_t N, int64_t T, int64_t D, double eps, int num_threads) {
  if (!valid_sizes(N, T, D, shift_row_stride, scale_row_stride) || !(eps >= 0.0))
    return Status::kInvalidArgument;
  if (N * T == 0) return Status::kOk;
  const FwdArgs a{x, shift, shift_row_stride, scale, scale_row_stride, y, mean, rstd, T, D, eps};
  switch (dtype) {
    case DType::kFloat32: fwd_driver<float>(a, N, num_threads); return Status::kOk;
    case DType::kFloat64: fwd_driver<double>(a, N, num_threads); return Status::kOk;
    case DType::kBFloat16: fwd_driver<bf16>(a, N, num_threads); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

Status ln_modulate_bwd(DType dtype, const void* dy, const void* x, const void* scale,
                       int64_t scale_row_stride, const void* mean, const void* rstd, void* dx,
                       void* dshift, void* dscale, int64_t N, int64_t T, int64_t D,
                       int num_threads) {
  if (!valid_sizes(N, T, D, scale_row_stride, 0)) return Status::kInvalidArgument;
  if (N * D == 0) return Status::kOk;  // nothing to write (dx is empty too)
  const BwdArgs a{dy, x, scale, scale_row_stride, mean, rstd, dx, T, D};
  switch (dtype) {
    case DType::kFloat32:
      bwd_driver<float>(a, N, static_cast<float*>(dshift), static_cast<float*>(dscale),
                        num_threads);
      return Status::kOk;
    case DType::kFloat64:
      bwd_driver<double>(a, N, static_cast<double*>(dshift), static_cast<double*>(dscale),
                         num_threads);
      return Status::kOk;
    case DType::kBFloat16:
      bwd_driver<bf16>(a, N, static_cast<bf16*>(dshift), static_cast<bf16*>(dscale),
                       num_threads);
      return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace cpu
}  // namespace dit_fast
