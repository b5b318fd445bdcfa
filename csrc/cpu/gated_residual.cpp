// CPU implementation of the gated residual update, alone and fused with LayerNorm + adaLN
// modulation (see gated_residual.h; math in common/gated_residual.h and common/ln_modulate.h).
//
// One pass over memory per row: the forward reads x, y (and the per-batch gate/shift/scale rows,
// cached per thread) and writes x_new and h; the row stays in cache for the statistics.
// Parallelism: OpenMP over rows (forward) or over (n, token-chunk) work items whose parameter
// gradients are reduced in a fixed order (backward), so results do not depend on the thread count.
// Vectorization: inner loops are `omp simd` loops in the accumulator type; bf16 rows are widened
// into per-thread fp32 scratch rows. Every routine is compiled for the generic ISA and (on x86)
// AVX2+FMA, chosen at run time (cpu/isa.h).

#include "cpu/gated_residual.h"

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <type_traits>

#include "common/bf16.h"
#include "common/gated_residual.h"
#include "common/ln_modulate.h"
#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/ln_modulate_rows.h"
#include "cpu/row_parallel.h"

namespace dit_fast {
namespace cpu {
namespace {

namespace lnm = ::dit_fast::ln_modulate;
namespace gr = ::dit_fast::gated_residual;
using rowpar::acc_t;
using rowpar::load_row;
using rowpar::store_row;
using rowpar::store_rounded;
using rowpar::widen;

// Per-thread scratch plus the batch index whose (N, D) parameter rows are widened in it.
struct Scratch {
  void* buf;
  int64_t cached_n;
};

// (N, D) parameter row n in the accumulator type: in place for fp32/fp64, else widened into
// `dst` (only when the batch index changed; rows of one batch entry are consecutive).
template <typename T>
DIT_FORCEINLINE const acc_t<T>* param_row(const void* base, int64_t rs, int64_t n, int64_t D,
                                          acc_t<T>* dst, bool refresh) {
  const T* src = static_cast<const T*>(base) + n * rs;
  if constexpr (std::is_same<T, acc_t<T>>::value) {
    (void)dst;
    (void)refresh;
    (void)D;
    return src;
  } else {
    if (refresh) load_row(src, dst, D);
    return dst;
  }
}

// ---- fused forward --------------------------------------------------------------------------

struct FusedFwdArgs {
  const void* x;
  const void* y;
  const void* gate;
  int64_t gate_rs;
  const void* shift;
  int64_t shift_rs;
  const void* scale;
  int64_t scale_rs;
  void* x_new;
  void* h;
  void* mean;
  void* rstd;
  int64_t T;
  int64_t D;
  double eps;
};

// scratch: 4 * D accumulator elements: [r | gate | shift | scale].
template <typename T>
DIT_FORCEINLINE void fused_fwd_row_impl(const FusedFwdArgs& a, int64_t row, Scratch& s) {
  using A = acc_t<T>;
  const int64_t D = a.D, n = row / a.T;
  A* buf = static_cast<A*>(s.buf);
  const bool refresh = s.cached_n != n;
  s.cached_n = n;
  const A* g = param_row<T>(a.gate, a.gate_rs, n, D, buf + D, refresh);
  const A* sh = param_row<T>(a.shift, a.shift_rs, n, D, buf + 2 * D, refresh);
  const A* sc = param_row<T>(a.scale, a.scale_rs, n, D, buf + 3 * D, refresh);
  const T* xr = static_cast<const T*>(a.x) + row * D;
  const T* yr = static_cast<const T*>(a.y) + row * D;
  T* xo = static_cast<T*>(a.x_new) + row * D;
  const A* r;
  if constexpr (std::is_same<T, A>::value) {
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d) xo[d] = gr::residual<A>(xr[d], g[d], yr[d]);
    r = xo;
  } else {  // widened, added and rounded in one pass; r: the stored values, exactly
    A* rr = buf;
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d)
      rr[d] = store_rounded(xo + d, gr::residual<A>(to_float(xr[d]), g[d], to_float(yr[d])));
    r = rr;
  }
  lnm_rows::forward<T, A>(r, sh, sc, D, static_cast<A>(a.eps), static_cast<T*>(a.h) + row * D,
                          static_cast<A*>(a.mean) + row, static_cast<A*>(a.rstd) + row);
}

// ---- fused backward -------------------------------------------------------------------------

struct FusedBwdArgs {
  const void* dx_new;  // may be null
  const void* dh;
  const void* x_new;
  const void* y;
  const void* gate;
  int64_t gate_rs;
  const void* scale;
  int64_t scale_rs;
  const void* mean;
  const void* rstd;
  void* dx;
  void* dy;
  int64_t T;
  int64_t D;
};

// Rows [t0, t1) of batch n. acc: 3 * D accumulators [dgate | dshift | dscale] (pre-zeroed).
// scratch: 7 * D accumulator elements: [r | dh | y | dx_new/dx | dy | gate | scale].
template <typename T>
DIT_FORCEINLINE void fused_bwd_chunk_impl(const FusedBwdArgs& a, int64_t n, int64_t t0, int64_t t1,
                                          acc_t<T>* acc, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  A* acc_dgate = acc;
  A* acc_dshift = acc + D;
  A* acc_dscale = acc + 2 * D;
  const A* gt = param_row<T>(a.gate, a.gate_rs, n, D, scratch + 5 * D, true);
  const A* sc = param_row<T>(a.scale, a.scale_rs, n, D, scratch + 6 * D, true);
  A* zero_row = scratch + 3 * D;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = n * a.T + t;
    const A* r = widen(static_cast<const T*>(a.x_new) + row * D, scratch, D);
    const A* dh = widen(static_cast<const T*>(a.dh) + row * D, scratch + D, D);
    const A mean = static_cast<const A*>(a.mean)[row];
    const A rstd = static_cast<const A*>(a.rstd)[row];

    A mean_g, mean_gx;
    lnm_rows::backward_sums<A>(r, dh, sc, mean, rstd, D, acc_dshift, acc_dscale, mean_g, mean_gx);

    const A* yr = widen(static_cast<const T*>(a.y) + row * D, scratch + 2 * D, D);
    const A* dxn;
    if (a.dx_new != nullptr) {
      dxn = widen(static_cast<const T*>(a.dx_new) + row * D, scratch + 3 * D, D);
    } else {
      std::fill(zero_row, zero_row + D, A(0));
      dxn = zero_row;
    }
    T* dxr = static_cast<T*>(a.dx) + row * D;
    T* dyr = static_cast<T*>(a.dy) + row * D;
    if constexpr (std::is_same<T, A>::value) {
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        const A xh = lnm::normalize<A>(r[d], mean, rstd);
        const A dr = gr::grad_residual<A>(dxn[d], lnm::grad_xhat<A>(dh[d], sc[d]), xh, rstd,
                                          mean_g, mean_gx);
        acc_dgate[d] += dr * yr[d];
        dxr[d] = dr;
        dyr[d] = gr::grad_y<A>(gt[d], dr);
      }
    } else {
      A* odx = scratch + 3 * D;  // in place over dx_new (or the zero row)
      A* ody = scratch + 4 * D;
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        const A xh = lnm::normalize<A>(r[d], mean, rstd);
        const A dr = gr::grad_residual<A>(dxn[d], lnm::grad_xhat<A>(dh[d], sc[d]), xh, rstd,
                                          mean_g, mean_gx);
        acc_dgate[d] += dr * yr[d];
        odx[d] = dr;
        ody[d] = gr::grad_y<A>(gt[d], dr);
      }
      store_row(odx, dxr, D);
      store_row(ody, dyr, D);
    }
  }
}

// ---- plain gated residual -----------------------------------------------------------------

struct PlainArgs {
  const void* x;     // fwd: x;   bwd: dout
  const void* y;
  const void* gate;
  int64_t gate_rs;
  void* out;         // fwd: out; bwd: dy
  int64_t T;
  int64_t D;
};

// scratch: D: [gate].
template <typename T>
DIT_FORCEINLINE void plain_fwd_row_impl(const PlainArgs& a, int64_t row, Scratch& s) {
  using A = acc_t<T>;
  const int64_t D = a.D, n = row / a.T;
  A* buf = static_cast<A*>(s.buf);
  const bool refresh = s.cached_n != n;
  s.cached_n = n;
  const A* g = param_row<T>(a.gate, a.gate_rs, n, D, buf, refresh);
  const T* xr = static_cast<const T*>(a.x) + row * D;
  const T* yr = static_cast<const T*>(a.y) + row * D;
  T* o = static_cast<T*>(a.out) + row * D;
  if constexpr (std::is_same<T, A>::value) {
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d) o[d] = gr::residual<A>(xr[d], g[d], yr[d]);
  } else {  // widened, added and rounded in one pass
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d)
      o[d].bits = float_to_bf16_bits(gr::residual<A>(to_float(xr[d]), g[d], to_float(yr[d])));
  }
}

// acc: D accumulators (dgate). scratch: 3 * D: [dout | y | gate].
template <typename T>
DIT_FORCEINLINE void plain_bwd_chunk_impl(const PlainArgs& a, int64_t n, int64_t t0, int64_t t1,
                                          acc_t<T>* acc, acc_t<T>* scratch) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  const A* g = param_row<T>(a.gate, a.gate_rs, n, D, scratch + 2 * D, true);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = n * a.T + t;
    const A* dor = widen(static_cast<const T*>(a.x) + row * D, scratch, D);
    const A* yr = widen(static_cast<const T*>(a.y) + row * D, scratch + D, D);
    T* dyr = static_cast<T*>(a.out) + row * D;
    if constexpr (std::is_same<T, A>::value) {
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        acc[d] += dor[d] * yr[d];
        dyr[d] = gr::grad_y<A>(g[d], dor[d]);
      }
    } else {
      A* tmp = scratch + D;  // in place over the widened y row
      DIT_OMP_SIMD
      for (int64_t d = 0; d < D; ++d) {
        acc[d] += dor[d] * yr[d];
        tmp[d] = gr::grad_y<A>(g[d], dor[d]);
      }
      store_row(tmp, dyr, D);
    }
  }
}

// ---- ISA clones ---------------------------------------------------------------------------

template <typename T>
using FusedFwdFn = void (*)(const FusedFwdArgs&, int64_t, Scratch&);
template <typename T>
using FusedBwdFn = void (*)(const FusedBwdArgs&, int64_t, int64_t, int64_t, acc_t<T>*, acc_t<T>*);
template <typename T>
using PlainFwdFn = void (*)(const PlainArgs&, int64_t, Scratch&);
template <typename T>
using PlainBwdFn = void (*)(const PlainArgs&, int64_t, int64_t, int64_t, acc_t<T>*, acc_t<T>*);

#define DIT_GR_CLONES(SUFFIX, ATTR)                                                             \
  template <typename T>                                                                         \
  ATTR void fused_fwd_row_##SUFFIX(const FusedFwdArgs& a, int64_t row, Scratch& s) {            \
    fused_fwd_row_impl<T>(a, row, s);                                                           \
  }                                                                                             \
  template <typename T>                                                                         \
  ATTR void fused_bwd_chunk_##SUFFIX(const FusedBwdArgs& a, int64_t n, int64_t t0, int64_t t1,  \
                                     acc_t<T>* acc, acc_t<T>* s) {                              \
    fused_bwd_chunk_impl<T>(a, n, t0, t1, acc, s);                                              \
  }                                                                                             \
  template <typename T>                                                                         \
  ATTR void plain_fwd_row_##SUFFIX(const PlainArgs& a, int64_t row, Scratch& s) {               \
    plain_fwd_row_impl<T>(a, row, s);                                                           \
  }                                                                                             \
  template <typename T>                                                                         \
  ATTR void plain_bwd_chunk_##SUFFIX(const PlainArgs& a, int64_t n, int64_t t0, int64_t t1,     \
                                     acc_t<T>* acc, acc_t<T>* s) {                              \
    plain_bwd_chunk_impl<T>(a, n, t0, t1, acc, s);                                              \
  }

#define DIT_NO_ATTR
DIT_GR_CLONES(generic, DIT_NO_ATTR)
#if DIT_CPU_HAVE_AVX2_PATH
DIT_GR_CLONES(avx2, DIT_TARGET_AVX2)
#define DIT_GR_PICK(NAME)                                                   \
  (active_isa() == Isa::kAvx2 ? &NAME##_avx2<T> : &NAME##_generic<T>)
#else
#define DIT_GR_PICK(NAME) (&NAME##_generic<T>)
#endif
#undef DIT_NO_ATTR
#undef DIT_GR_CLONES

// ---- drivers ------------------------------------------------------------------------------

// Runs `fn(args, row, scratch)` over all rows, OpenMP-parallel, with per-thread scratch.
template <typename T, typename Args, typename Fn>
void rows_driver(const Args& a, int64_t rows, int64_t D, int64_t scratch_elems, int num_threads,
                 Fn fn) {
  using A = acc_t<T>;
  const int nt = rowpar::resolve_threads(num_threads, rows, rows * D);
  scratch_elems = std::max<int64_t>(scratch_elems, 1);
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

template <typename T>
void fused_fwd(const FusedFwdArgs& a, int64_t N, int num_threads) {
  const FusedFwdFn<T> fn = DIT_GR_PICK(fused_fwd_row);
  rows_driver<T>(a, N * a.T, a.D, 4 * a.D, num_threads, fn);
}

template <typename T>
void fused_bwd(const FusedBwdArgs& a, int64_t N, void* dgate, void* dshift, void* dscale,
               int num_threads) {
  using A = acc_t<T>;
  const FusedBwdFn<T> fn = DIT_GR_PICK(fused_bwd_chunk);
  const int64_t D = a.D;
  T* outs[3] = {static_cast<T*>(dgate), static_cast<T*>(dshift), static_cast<T*>(dscale)};
  rowpar::token_chunk_reduce<A>(
      N, a.T, D, 3, 7 * D, num_threads,
      [&](int64_t n, int64_t t0, int64_t t1, A* acc, A* s) { fn(a, n, t0, t1, acc, s); },
      [&](int64_t n, int k, const A* sums) { store_row(sums, outs[k] + n * D, D); });
}

template <typename T>
void plain_fwd(const PlainArgs& a, int64_t N, int num_threads) {
  const PlainFwdFn<T> fn = DIT_GR_PICK(plain_fwd_row);
  rows_driver<T>(a, N * a.T, a.D, a.D, num_threads, fn);
}

template <typename T>
void plain_bwd(const PlainArgs& a, int64_t N, void* dgate, int num_threads) {
  using A = acc_t<T>;
  const PlainBwdFn<T> fn = DIT_GR_PICK(plain_bwd_chunk);
  const int64_t D = a.D;
  T* out = static_cast<T*>(dgate);
  rowpar::token_chunk_reduce<A>(
      N, a.T, D, 1, 3 * D, num_threads,
      [&](int64_t n, int64_t t0, int64_t t1, A* acc, A* s) { fn(a, n, t0, t1, acc, s); },
      [&](int64_t n, int, const A* sums) { store_row(sums, out + n * D, D); });
}

#undef DIT_GR_PICK

bool valid(int64_t N, int64_t T, int64_t D, std::initializer_list<int64_t> strides) {
  if (N < 0 || T < 0 || D < 0) return false;
  for (int64_t s : strides)
    if (s < 0) return false;
  return true;
}

// Calls f.template operator()<T>() for the storage type of `dtype` (CPU: fp32, fp64, bf16).
template <typename F>
Status dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return Status::kOk;
    case DType::kFloat64: f(double{}); return Status::kOk;
    case DType::kBFloat16: f(bf16{}); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace

Status gated_residual_ln_modulate_fwd(DType dtype, const void* x, const void* y, const void* gate,
                                      int64_t gate_rs, const void* shift, int64_t shift_rs,
                                      const void* scale, int64_t scale_rs, void* x_new, void* h,
                                      void* mean, void* rstd, int64_t N, int64_t T, int64_t D,
                                      double eps, int num_threads) {
  if (!valid(N, T, D, {gate_rs, shift_rs, scale_rs}) || !(eps >= 0.0))
    return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64 && dtype != DType::kBFloat16)
    return Status::kUnsupportedDType;
  if (N * T == 0) return Status::kOk;
  const FusedFwdArgs a{x,     y, gate, gate_rs, shift, shift_rs, scale, scale_rs, x_new, h,
                       mean, rstd, T,   D,       eps};
  return dispatch(dtype, [&](auto tag) { fused_fwd<decltype(tag)>(a, N, num_threads); });
}

Status gated_residual_ln_modulate_bwd(DType dtype, const void* dx_new, const void* dh,
                                      const void* x_new, const void* y, const void* gate,
                                      int64_t gate_rs, const void* scale, int64_t scale_rs,
                                      const void* mean, const void* rstd, void* dx, void* dy,
                                      void* dgate, void* dshift, void* dscale, int64_t N,
                                      int64_t T, int64_t D, int num_threads) {
  if (!valid(N, T, D, {gate_rs, scale_rs})) return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64 && dtype != DType::kBFloat16)
    return Status::kUnsupportedDType;
  if (N * D == 0) return Status::kOk;
  const FusedBwdArgs a{dx_new, dh, x_new, y, gate, gate_rs, scale, scale_rs, mean, rstd, dx, dy,
                       T,      D};
  return dispatch(dtype, [&](auto tag) {
    fused_bwd<decltype(tag)>(a, N, dgate, dshift, dscale, num_threads);
  });
}

Status gated_residual_fwd(DType dtype, const void* x, const void* y, const void* gate,
                          int64_t gate_rs, void* out, int64_t N, int64_t T, int64_t D,
                          int num_threads) {
  if (!valid(N, T, D, {gate_rs})) return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64 && dtype != DType::kBFloat16)
    return Status::kUnsupportedDType;
  if (N * T * D == 0) return Status::kOk;
  const PlainArgs a{x, y, gate, gate_rs, out, T, D};
  return dispatch(dtype, [&](auto tag) { plain_fwd<decltype(tag)>(a, N, num_threads); });
}

Status gated_residual_bwd(DType dtype, const void* dout, const void* y, const void* gate,
                          int64_t gate_rs, void* dy, void* dgate, int64_t N, int64_t T, int64_t D,
                          int num_threads) {
  if (!valid(N, T, D, {gate_rs})) return Status::kInvalidArgument;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat64 && dtype != DType::kBFloat16)
    return Status::kUnsupportedDType;
  if (N * D == 0) return Status::kOk;
  const PlainArgs a{dout, y, gate, gate_rs, dy, T, D};
  return dispatch(dtype, [&](auto tag) { plain_bwd<decltype(tag)>(a, N, dgate, num_threads); });
}

}  // namespace cpu
}  // namespace dit_fast
