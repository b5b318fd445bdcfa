// CPU implementation of the patch embedding (one GEMM over patches, bias + pos_embed in the
// epilogue), its backward, and unpatchify. See cpu/patchify.h and common/patchify.h.
//
// GEMM structure: a register tile of MR rows x NB columns (2 SIMD vectors) accumulated over the
// reduction dimension, with the B operand packed into NB-wide panels (zero-padded):
//   forward  out[M x D]  = P[M x K] @ Wt[K x D]      P = the patches (gathered per row tile)
//   dx       dP[M x K]   = dout[M x D] @ W[D x K]     scattered back to (N, C, H, W)
//   dweight  dWt[K x D]  = P^T[K x M] @ dout[M x D]   (+ dbias = column sums of dout)
// with M = N * T rows. Parallelism: OpenMP over row tiles (forward, dx) or over output column
// panels (dweight / dbias: each panel is owned by one thread and reduced over all rows in a fixed
// order), so results are independent of the number of threads.
// Every routine is instantiated for the generic ISA and (x86) AVX2+FMA, picked at run time; the
// AVX2 clone contracts the tile's multiply-adds into FMAs.

#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in the generic clone (never exported)
#endif

#include "cpu/patchify.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/bf16.h"
#include "common/macros.h"
#include "common/patchify.h"
#include "cpu/embed_common.h"
#include "cpu/isa.h"

namespace dit_fast {
namespace cpu {
namespace {

namespace pf = ::dit_fast::patchify;
using embed::acc_t;
using embed::from_acc;
using embed::resolve_threads;
using embed::to_acc;

constexpr int kMR = 4;  // rows per register tile

// ---- SIMD vectors of 32 bytes (GCC/Clang vector extensions; plain arrays elsewhere) ---------

#if defined(__GNUC__) || defined(__clang__)
template <typename A>
struct VecT;
template <>
struct VecT<float> {
  typedef float v __attribute__((vector_size(32)));
  typedef float u __attribute__((vector_size(32), aligned(4)));
};
template <>
struct VecT<double> {
  typedef double v __attribute__((vector_size(32)));
  typedef double u __attribute__((vector_size(32), aligned(8)));
};
template <typename A>
using vec = typename VecT<A>::v;
template <typename A>
DIT_FORCEINLINE vec<A> vload(const A* p) {
  return *reinterpret_cast<const typename VecT<A>::u*>(p);
}
template <typename A>
DIT_FORCEINLINE void vstore(A* p, const vec<A>& v) {
  *reinterpret_cast<typename VecT<A>::u*>(p) = v;
}
template <typename A>
DIT_FORCEINLINE vec<A> vzero() {
  return vec<A>{};
}
template <typename A>
DIT_FORCEINLINE vec<A> vbroadcast(A a) {
  return vec<A>{} + a;
}
#else
template <typename A>
struct vec {
  A v[32 / sizeof(A)];
  vec operator*(const vec& o) const {
    vec r;
    for (int i = 0; i < int(32 / sizeof(A)); ++i) r.v[i] = v[i] * o.v[i];
    return r;
  }
  vec operator+(const vec& o) const {
    vec r;
    for (int i = 0; i < int(32 / sizeof(A)); ++i) r.v[i] = v[i] + o.v[i];
    return r;
  }
};
template <typename A>
DIT_FORCEINLINE vec<A> vload(const A* p) {
  vec<A> r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
template <typename A>
DIT_FORCEINLINE void vstore(A* p, const vec<A>& v) {
  std::memcpy(p, v.v, sizeof(v.v));
}
template <typename A>
DIT_FORCEINLINE vec<A> vzero() {
  vec<A> r;
  for (auto& e : r.v) e = A(0);
  return r;
}
template <typename A>
DIT_FORCEINLINE vec<A> vbroadcast(A a) {
  vec<A> r;
  for (auto& e : r.v) e = a;
  return r;
}
#endif

template <typename A>
constexpr int kVW = 32 / sizeof(A);  // lanes per vector
template <typename A>
constexpr int kNB = 2 * kVW<A>;  // columns per register tile / packed panel

// Register tile: acc[r] (2 vectors) += sum_q a(r, q) * B[q, 0:NB] over q < kred, where
// a(r, q) = arow[r][q * a_step] (converted to A) and B[q, :] = b + q * NB (packed panel).
template <typename A, typename Ta>
DIT_FORCEINLINE void tile_rows(int64_t kred, const Ta* const* arow, int64_t a_step, const A* b,
                               vec<A> (&acc)[kMR][2]) {
  for (int64_t q = 0; q < kred; ++q) {
    const vec<A> b0 = vload(b + q * kNB<A>);
    const vec<A> b1 = vload(b + q * kNB<A> + kVW<A>);
    for (int r = 0; r < kMR; ++r) {
      const vec<A> av = vbroadcast<A>(to_acc<A>(arow[r][q * a_step]));
      acc[r][0] = av * b0 + acc[r][0];
      acc[r][1] = av * b1 + acc[r][1];
    }
  }
}

template <typename A>
DIT_FORCEINLINE void tile_zero(vec<A> (&acc)[kMR][2]) {
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = vzero<A>();
}

template <typename A>
DIT_FORCEINLINE void tile_spill(const vec<A> (&acc)[kMR][2], A (&out)[kMR][kNB<A>]) {
  for (int r = 0; r < kMR; ++r) {
    vstore(out[r], acc[r][0]);
    vstore(out[r] + kVW<A>, acc[r][1]);
  }
}

// ---- shapes ---------------------------------------------------------------------------------

struct Geo {
  int64_t N, C, H, W, p, D;
  int64_t Hg, Wg, T, K, M;
  Geo(int64_t N_, int64_t C_, int64_t H_, int64_t W_, int64_t p_, int64_t D_)
      : N(N_), C(C_), H(H_), W(W_), p(p_), D(D_) {
    Hg = H / p;
    Wg = W / p;
    T = Hg * Wg;
    K = C * p * p;
    M = N * T;
  }
};

// Gathers the patch of row m = n * T + t into dst[0:K] (accumulator type).
template <typename T, typename A>
DIT_FORCEINLINE void gather_patch(const Geo& g, const T* x, int64_t m, A* dst) {
  const int64_t n = m / g.T, t = m - n * g.T;
  const int64_t gh = t / g.Wg, gw = t - gh * g.Wg;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t i = 0; i < g.p; ++i) {
      const T* src = x + pf::patch_row_offset(n, gh, gw, c, i, g.C, g.H, g.W, g.p);
      A* d = dst + (c * g.p + i) * g.p;
      for (int64_t j = 0; j < g.p; ++j) d[j] = to_acc<A>(src[j]);
    }
  }
}

// Packs the (D, K) weight into ceil(D / NB) panels of (K, NB): Wp[(pn * K + k) * NB + j] =
// w[(pn * NB + j) * K + k] (zero past D). Used by the forward.
template <typename T, typename A>
DIT_FORCEINLINE void pack_wt_panel(const Geo& g, const T* w, int64_t pn, A* wp) {
  constexpr int NB = kNB<A>;
  A* dst = wp + pn * g.K * NB;
  for (int j = 0; j < NB; ++j) {
    const int64_t d = pn * NB + j;
    if (d < g.D) {
      const T* src = w + d * g.K;
      for (int64_t k = 0; k < g.K; ++k) dst[k * NB + j] = to_acc<A>(src[k]);
    } else {
      for (int64_t k = 0; k < g.K; ++k) dst[k * NB + j] = A(0);
    }
  }
}

// Packs the (D, K) weight into ceil(K / NB) panels of (D, NB): Wq[(pk * D + d) * NB + j] =
// w[d * K + pk * NB + j] (zero past K). Used by dx.
template <typename T, typename A>
DIT_FORCEINLINE void pack_w_panel(const Geo& g, const T* w, int64_t pk, A* wq) {
  constexpr int NB = kNB<A>;
  A* dst = wq + pk * g.D * NB;
  for (int64_t d = 0; d < g.D; ++d) {
    for (int j = 0; j < NB; ++j) {
      const int64_t k = pk * NB + j;
      dst[d * NB + j] = k < g.K ? to_acc<A>(w[d * g.K + k]) : A(0);
    }
  }
}

// ---- forward: one row tile (MR rows of out), all columns ----------------------------------

struct FwdArgs {
  const void* x;
  const void* bias;
  const void* pos;
  void* out;
  const void* wp;  // packed panels (accumulator type)
};

// scratch: MR * K accumulator elements.
template <typename T>
DIT_FORCEINLINE void fwd_tile_impl(const Geo& g, const FwdArgs& a, int64_t tile, void* scratch) {
  using A = acc_t<T>;
  constexpr int NB = kNB<A>;
  const T* x = static_cast<const T*>(a.x);
  const T* bias = static_cast<const T*>(a.bias);
  const T* pos = static_cast<const T*>(a.pos);
  T* out = static_cast<T*>(a.out);
  const A* wp = static_cast<const A*>(a.wp);
  A* P = static_cast<A*>(scratch);
  const int64_t m0 = tile * kMR;
  const int rows = static_cast<int>(std::min<int64_t>(kMR, g.M - m0));
  const A* arow[kMR];
  for (int r = 0; r < kMR; ++r) {
    A* pr = P + r * g.K;
    if (r < rows) {
      gather_patch<T, A>(g, x, m0 + r, pr);
    } else {
      std::fill(pr, pr + g.K, A(0));
    }
    arow[r] = pr;
  }
  const int64_t panels = (g.D + NB - 1) / NB;
  alignas(32) A tileout[kMR][NB];
  for (int64_t pn = 0; pn < panels; ++pn) {
    vec<A> acc[kMR][2];
    tile_zero<A>(acc);
    tile_rows<A, A>(g.K, arow, 1, wp + pn * g.K * NB, acc);
    tile_spill<A>(acc, tileout);
    const int64_t d0 = pn * NB;
    const int cols = static_cast<int>(std::min<int64_t>(NB, g.D - d0));
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const int64_t t = m % g.T;
      T* o = out + m * g.D + d0;
      const T* pr = pos ? pos + t * g.D + d0 : nullptr;
      for (int j = 0; j < cols; ++j) {
        const A b = bias ? to_acc<A>(bias[d0 + j]) : A(0);
        const A pv = pr ? to_acc<A>(pr[j]) : A(0);
        o[j] = from_acc<T>(pf::epilogue<A>(tileout[r][j], b, pv));
      }
    }
  }
}

// ---- backward: dx for one row tile ----------------------------------------------------------

struct DxArgs {
  const void* dout;
  const void* wq;  // packed (D, NB) panels over K (accumulator type)
  void* dx;
  const void* zero_row;  // D zeros of the storage type (rows past M)
};

template <typename T>
DIT_FORCEINLINE void dx_tile_impl(const Geo& g, const DxArgs& a, int64_t tile) {
  using A = acc_t<T>;
  constexpr int NB = kNB<A>;
  const T* dout = static_cast<const T*>(a.dout);
  const A* wq = static_cast<const A*>(a.wq);
  T* dx = static_cast<T*>(a.dx);
  const int64_t m0 = tile * kMR;
  const int rows = static_cast<int>(std::min<int64_t>(kMR, g.M - m0));
  const T* arow[kMR];
  for (int r = 0; r < kMR; ++r)
    arow[r] = r < rows ? dout + (m0 + r) * g.D : static_cast<const T*>(a.zero_row);
  const int64_t kpanels = (g.K + NB - 1) / NB;
  alignas(32) A tileout[kMR][NB];
  for (int64_t pk = 0; pk < kpanels; ++pk) {
    vec<A> acc[kMR][2];
    tile_zero<A>(acc);
    tile_rows<A, T>(g.D, arow, 1, wq + pk * g.D * NB, acc);
    tile_spill<A>(acc, tileout);
    const int64_t k0 = pk * NB;
    const int cols = static_cast<int>(std::min<int64_t>(NB, g.K - k0));
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const int64_t n = m / g.T, t = m - n * g.T;
      for (int j = 0; j < cols; ++j)
        dx[pf::patch_src_offset(n, t, k0 + j, g.C, g.H, g.W, g.p, g.Wg)] =
            from_acc<T>(tileout[r][j]);
    }
  }
}

// ---- backward: dweight / dbias for one column panel ----------------------------------------

struct DwArgs {
  const void* dout;
  const void* P;  // im2col patches (M, Kp) in the accumulator type, Kp = K rounded up to MR
  int64_t Kp;
  void* dw;   // (D, K) storage type, or null
  void* db;   // (D,) storage type, or null
};

constexpr int64_t kDwChunk = 256;  // rows per step of the dweight reduction

// scratch: (Kp + 1) * NB accumulators + kDwChunk * NB widened dout values.
template <typename T>
DIT_FORCEINLINE void dw_panel_impl(const Geo& g, const DwArgs& a, int64_t pn, void* scratch) {
  using A = acc_t<T>;
  constexpr int NB = kNB<A>;
  const T* dout = static_cast<const T*>(a.dout);
  const A* P = static_cast<const A*>(a.P);
  const int64_t Kp = a.Kp;
  A* accw = static_cast<A*>(scratch);    // (Kp, NB): dWt for this panel
  A* accb = accw + Kp * NB;              // (NB,): dbias
  A* bbuf = accb + NB;                   // (kDwChunk, NB): widened dout strip
  std::fill(accw, accw + (Kp + 1) * NB, A(0));
  const int64_t d0 = pn * NB;
  const int cols = static_cast<int>(std::min<int64_t>(NB, g.D - d0));
  for (int64_t m0 = 0; m0 < g.M; m0 += kDwChunk) {
    const int64_t rows = std::min<int64_t>(kDwChunk, g.M - m0);
    // widen the (rows, cols) strip of dout (zero-padded to NB columns)
    for (int64_t m = 0; m < rows; ++m) {
      const T* src = dout + (m0 + m) * g.D + d0;
      A* dst = bbuf + m * NB;
      for (int j = 0; j < cols; ++j) dst[j] = to_acc<A>(src[j]);
      for (int j = cols; j < NB; ++j) dst[j] = A(0);
    }
    // dbias
    {
      vec<A> s0 = vload(accb), s1 = vload(accb + kVW<A>);
      for (int64_t m = 0; m < rows; ++m) {
        s0 = s0 + vload(bbuf + m * NB);
        s1 = s1 + vload(bbuf + m * NB + kVW<A>);
      }
      vstore(accb, s0);
      vstore(accb + kVW<A>, s1);
    }
    // dWt[k0:k0+MR, panel] += P[m0:m0+rows, k0:k0+MR]^T @ strip
    for (int64_t k0 = 0; k0 < Kp; k0 += kMR) {
      vec<A> acc[kMR][2];
      for (int r = 0; r < kMR; ++r) {
        acc[r][0] = vload(accw + (k0 + r) * NB);
        acc[r][1] = vload(accw + (k0 + r) * NB + kVW<A>);
      }
      const A* arow[kMR];
      for (int r = 0; r < kMR; ++r) arow[r] = P + m0 * Kp + k0 + r;
      tile_rows<A, A>(rows, arow, Kp, bbuf, acc);
      for (int r = 0; r < kMR; ++r) {
        vstore(accw + (k0 + r) * NB, acc[r][0]);
        vstore(accw + (k0 + r) * NB + kVW<A>, acc[r][1]);
      }
    }
  }
  if (a.dw != nullptr) {
    T* dw = static_cast<T*>(a.dw);
    for (int j = 0; j < cols; ++j)
      for (int64_t k = 0; k < g.K; ++k) dw[(d0 + j) * g.K + k] = from_acc<T>(accw[k * NB + j]);
  }
  if (a.db != nullptr) {
    T* db = static_cast<T*>(a.db);
    for (int j = 0; j < cols; ++j) db[d0 + j] = from_acc<T>(accb[j]);
  }
}

// ---- ISA clones -----------------------------------------------------------------------------

template <typename T>
struct Fns {
  void (*fwd_tile)(const Geo&, const FwdArgs&, int64_t, void*);
  void (*dx_tile)(const Geo&, const DxArgs&, int64_t);
  void (*dw_panel)(const Geo&, const DwArgs&, int64_t, void*);
};

template <typename T>
void fwd_tile_generic(const Geo& g, const FwdArgs& a, int64_t tile, void* s) {
  fwd_tile_impl<T>(g, a, tile, s);
}
template <typename T>
void dx_tile_generic(const Geo& g, const DxArgs& a, int64_t tile) {
  dx_tile_impl<T>(g, a, tile);
}
template <typename T>
void dw_panel_generic(const Geo& g, const DwArgs& a, int64_t pn, void* s) {
  dw_panel_impl<T>(g, a, pn, s);
}
#if DIT_CPU_HAVE_AVX2_PATH
template <typename T>
DIT_TARGET_AVX2 void fwd_tile_avx2(const Geo& g, const FwdArgs& a, int64_t tile, void* s) {
  fwd_tile_impl<T>(g, a, tile, s);
}
template <typename T>
DIT_TARGET_AVX2 void dx_tile_avx2(const Geo& g, const DxArgs& a, int64_t tile) {
  dx_tile_impl<T>(g, a, tile);
}
template <typename T>
DIT_TARGET_AVX2 void dw_panel_avx2(const Geo& g, const DwArgs& a, int64_t pn, void* s) {
  dw_panel_impl<T>(g, a, pn, s);
}
#endif

template <typename T>
Fns<T> pick() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return {&fwd_tile_avx2<T>, &dx_tile_avx2<T>, &dw_panel_avx2<T>};
#endif
  return {&fwd_tile_generic<T>, &dx_tile_generic<T>, &dw_panel_generic<T>};
}

// ---- drivers --------------------------------------------------------------------------------

template <typename T>
void fwd_driver(const Geo& g, const T* x, const T* w, const T* bias, const T* pos, T* out,
                int num_threads) {
  using A = acc_t<T>;
  constexpr int NB = kNB<A>;
  const Fns<T> fns = pick<T>();
  const int64_t panels = (g.D + NB - 1) / NB;
  const int64_t tiles = (g.M + kMR - 1) / kMR;
  std::unique_ptr<A[]> wp(new A[panels * g.K * NB]);
  const FwdArgs a{x, bias, pos, out, wp.get()};
  const int nt = resolve_threads(num_threads, std::max(tiles, panels), g.M * g.D * (g.K + 1));
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t pn = 0; pn < panels; ++pn) pack_wt_panel<T, A>(g, w, pn, wp.get());
    std::unique_ptr<A[]> scratch(new A[kMR * g.K]);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t tile = 0; tile < tiles; ++tile) fns.fwd_tile(g, a, tile, scratch.get());
  }
  (void)nt;
}

template <typename T>
void bwd_driver(const Geo& g, const T* dout, const T* x, const T* w, T* dx, T* dw, T* db,
                int num_threads) {
  using A = acc_t<T>;
  constexpr int NB = kNB<A>;
  const Fns<T> fns = pick<T>();
  const int64_t work = g.M * g.D * g.K;
  if (dx != nullptr) {
    const int64_t kpanels = (g.K + NB - 1) / NB;
    const int64_t tiles = (g.M + kMR - 1) / kMR;
    std::unique_ptr<A[]> wq(new A[kpanels * g.D * NB]);
    std::unique_ptr<T[]> zero_row(new T[g.D]);
    std::fill(zero_row.get(), zero_row.get() + g.D, from_acc<T>(A(0)));
    const DxArgs a{dout, wq.get(), dx, zero_row.get()};
    const int nt = resolve_threads(num_threads, tiles, work);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t pk = 0; pk < kpanels; ++pk) pack_w_panel<T, A>(g, w, pk, wq.get());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t tile = 0; tile < tiles; ++tile) fns.dx_tile(g, a, tile);
    }
    (void)nt;
  }
  if (dw != nullptr || db != nullptr) {
    const int64_t Kp = (g.K + kMR - 1) / kMR * kMR;
    const int64_t panels = (g.D + NB - 1) / NB;
    std::unique_ptr<A[]> P(new A[std::max<int64_t>(g.M * Kp, 1)]);
    const DwArgs a{dout, P.get(), Kp, dw, db};
    const int nt = resolve_threads(num_threads, panels, work);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t m = 0; m < g.M; ++m) {
        A* row = P.get() + m * Kp;
        gather_patch<T, A>(g, x, m, row);
        for (int64_t k = g.K; k < Kp; ++k) row[k] = A(0);
      }
      std::unique_ptr<A[]> scratch(new A[(Kp + 1) * NB + kDwChunk * NB]);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t pn = 0; pn < panels; ++pn) fns.dw_panel(g, a, pn, scratch.get());
    }
    (void)nt;
  }
}

// ---- unpatchify (a permutation; element size only) ------------------------------------------

template <typename E>
void unpatchify_driver(const E* src, E* dst, int64_t N, int64_t Co, int64_t Hg, int64_t Wg,
                       int64_t p, bool forward, int num_threads) {
  // One work item per output/input image row (n, c, h): W = Wg * p contiguous image elements.
  const int64_t H = Hg * p, W = Wg * p, T = Hg * Wg;
  const int64_t rows = N * Co * H;
  const int nt = resolve_threads(num_threads, rows, rows * W);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t h = row % H;
    const int64_t nc = row / H;
    const int64_t c = nc % Co, n = nc / Co;
    const int64_t base = pf::unpatchify_src_offset(n, c, h, 0, Co, p, Wg, T);
    const int64_t gstride = p * p * Co;  // next token (gw + 1)
    E* img_row = forward ? dst + row * W : nullptr;
    const E* dimg_row = forward ? nullptr : src + row * W;
    for (int64_t gw = 0; gw < Wg; ++gw) {
      const int64_t tok = base + gw * gstride;
      for (int64_t j = 0; j < p; ++j) {
        if (forward) {
          img_row[gw * p + j] = src[tok + j * Co];
        } else {
          dst[tok + j * Co] = dimg_row[gw * p + j];
        }
      }
    }
  }
  (void)nt;
}

template <typename Fn>
Status by_elem_size(int elem_size, Fn&& fn) {
  switch (elem_size) {
    case 2: fn(uint16_t{}); return Status::kOk;
    case 4: fn(uint32_t{}); return Status::kOk;
    case 8: fn(uint64_t{}); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

bool valid_geo(int64_t N, int64_t C, int64_t H, int64_t W, int64_t p, int64_t D) {
  return N >= 0 && C >= 0 && H >= 0 && W >= 0 && p > 0 && D >= 0 && H % p == 0 && W % p == 0;
}

}  // namespace

Status patch_embed_fwd(DType dtype, const void* x, const void* weight, const void* bias,
                       const void* pos, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t p, int64_t D, int num_threads) {
  if (!valid_geo(N, C, H, W, p, D)) return Status::kInvalidArgument;
  const Geo g(N, C, H, W, p, D);
  if (g.M * D == 0) return Status::kOk;
  switch (dtype) {
    case DType::kFloat32:
      fwd_driver<float>(g, static_cast<const float*>(x), static_cast<const float*>(weight),
                        static_cast<const float*>(bias), static_cast<const float*>(pos),
                        static_cast<float*>(out), num_threads);
      return Status::kOk;
    case DType::kFloat64:
      fwd_driver<double>(g, static_cast<const double*>(x), static_cast<const double*>(weight),
                         static_cast<const double*>(bias), static_cast<const double*>(pos),
                         static_cast<double*>(out), num_threads);
      return Status::kOk;
    case DType::kBFloat16:
      fwd_driver<bf16>(g, static_cast<const bf16*>(x), static_cast<const bf16*>(weight),
                       static_cast<const bf16*>(bias), static_cast<const bf16*>(pos),
                       static_cast<bf16*>(out), num_threads);
      return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

Status patch_embed_bwd(DType dtype, const void* dout, const void* x, const void* weight, void* dx,
                       void* dweight, void* dbias, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t p, int64_t D, int num_threads) {
  if (!valid_geo(N, C, H, W, p, D)) return Status::kInvalidArgument;
  const Geo g(N, C, H, W, p, D);
  // Degenerate sizes: zero-fill whatever was requested (empty sums).
  auto zero = [&](size_t esize) {
    if (dx) std::memset(dx, 0, static_cast<size_t>(N * C * H * W) * esize);
    if (dweight) std::memset(dweight, 0, static_cast<size_t>(D * g.K) * esize);
    if (dbias) std::memset(dbias, 0, static_cast<size_t>(D) * esize);
  };
  switch (dtype) {
    case DType::kFloat32:
      if (g.M == 0 || D == 0 || g.K == 0) return zero(4), Status::kOk;
      bwd_driver<float>(g, static_cast<const float*>(dout), static_cast<const float*>(x),
                        static_cast<const float*>(weight), static_cast<float*>(dx),
                        static_cast<float*>(dweight), static_cast<float*>(dbias), num_threads);
      return Status::kOk;
    case DType::kFloat64:
      if (g.M == 0 || D == 0 || g.K == 0) return zero(8), Status::kOk;
      bwd_driver<double>(g, static_cast<const double*>(dout), static_cast<const double*>(x),
                         static_cast<const double*>(weight), static_cast<double*>(dx),
                         static_cast<double*>(dweight), static_cast<double*>(dbias), num_threads);
      return Status::kOk;
    case DType::kBFloat16:
      if (g.M == 0 || D == 0 || g.K == 0) return zero(2), Status::kOk;
      bwd_driver<bf16>(g, static_cast<const bf16*>(dout), static_cast<const bf16*>(x),
                       static_cast<const bf16*>(weight), static_cast<bf16*>(dx),
                       static_cast<bf16*>(dweight), static_cast<bf16*>(dbias), num_threads);
      return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

Status unpatchify_fwd(int elem_size, const void* y, void* img, int64_t N, int64_t Co, int64_t Hg,
                      int64_t Wg, int64_t p, int num_threads) {
  if (N < 0 || Co < 0 || Hg < 0 || Wg < 0 || p <= 0) return Status::kInvalidArgument;
  return by_elem_size(elem_size, [&](auto e) {
    using E = decltype(e);
    unpatchify_driver<E>(static_cast<const E*>(y), static_cast<E*>(img), N, Co, Hg, Wg, p, true,
                         num_threads);
  });
}

Status unpatchify_bwd(int elem_size, const void* dimg, void* dy, int64_t N, int64_t Co,
                      int64_t Hg, int64_t Wg, int64_t p, int num_threads) {
  if (N < 0 || Co < 0 || Hg < 0 || Wg < 0 || p <= 0) return Status::kInvalidArgument;
  return by_elem_size(elem_size, [&](auto e) {
    using E = decltype(e);
    unpatchify_driver<E>(static_cast<const E*>(dimg), static_cast<E*>(dy), N, Co, Hg, Wg, p,
                         false, num_threads);
  });
}

}  // namespace cpu
}  // namespace dit_fast
