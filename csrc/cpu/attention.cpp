// CPU attention forward (see attention.h).
//
// Work item = (n, h, block of kBQ queries); OpenMP over items, dynamically scheduled (an item is
// ~0.1 ms of work, so the overhead is negligible, and a thread that the OS preempts on a busy
// machine does not hold up the others). Everything is laid out with the *query index innermost*,
// so every step vectorizes along queries:
//   Qt[d][i]  = q[i][d] * scale * log2(e)        (packed once per item, zero-padded to 16 columns)
//   S[j][i]   = sum_d k[j][d] * Qt[d][i]          (k rows read in place from qkv, broadcast per d)
//   online softmax in base 2, per query column i: running max m[i], sum l[i]
//   Ot[d][i] += sum_j v[j][d] * P[j][i]           (v rows read in place from qkv, broadcast per j)
//   out[i][d] = Ot[d][i] / l[i],  lse[i] = (m[i] + log2 l[i]) * ln 2
// so neither k nor v is ever transposed or copied (bf16 rows are widened per key block), and the
// row-wise softmax reductions are plain element-wise vector ops across key rows.
//
// ISA: the block routines (S = K Qt, the softmax update, Ot += V^T P) exist as a generic build
// (plain loops, any accumulator type) and, on x86, AVX2+FMA intrinsics for fp32 accumulation with
// a polynomial exp2 (relative error < 1e-7 before rounding); chosen at run time (cpu/isa.h).
// Determinism: each item is computed by one thread in a fixed order, so results do not depend on
// the thread count.

#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/bf16.h"
#include "common/macros.h"
#include "cpu/isa.h"
#include "cpu/row_parallel.h"

#if DIT_CPU_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace dit_fast {
namespace cpu {
namespace {

// Fully unroll the tile loops over rows early enough that GCC keeps the accumulator arrays in
// registers (without it, it mirrors them to the stack on every iteration).
#if defined(__clang__)
#define DIT_UNROLL_R _Pragma("unroll")
#elif defined(__GNUC__)
#define DIT_UNROLL_R _Pragma("GCC unroll 8")
#else
#define DIT_UNROLL_R
#endif

constexpr int64_t kBQ = 64;  // queries per work item
constexpr int64_t kBK = 64;  // keys per online-softmax block
constexpr int64_t kIC = 16;  // query columns per microkernel tile (2 x 8 floats)
// Row stride of Qt / S / Ot = query columns + kPad: 64 + 16 floats = 320 bytes, so consecutive rows
// do not all map to the same few L1 sets (a 256-byte stride uses only a quarter of them).
constexpr int64_t kPad = 16;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

using rowpar::AccOf;  // float accumulators for float32 / bfloat16, double for float64

using rowpar::from_acc;
using rowpar::to_acc;

// ---- block routines: generic ------------------------------------------------------------------
// Shapes: nk keys (rows of S / P), bq query columns (multiple of kIC), Dh head dim.
// k / v: row j at k + j * ldk (unit stride along d). S, P, Qt, Ot: row stride ld >= bq.

template <typename A>
struct GenericBlocks {
  static void qk(const A* k, int64_t ldk, int64_t nk, const A* qt, int64_t bq, int64_t ld, int64_t Dh,
                 A* S, A* bmax) {
    std::fill(bmax, bmax + bq, -std::numeric_limits<A>::infinity());
    for (int64_t j = 0; j < nk; ++j) {
      A* s = S + j * ld;
      std::fill(s, s + bq, A(0));
      const A* kr = k + j * ldk;
      for (int64_t d = 0; d < Dh; ++d) {
        const A kv = kr[d];
        const A* q = qt + d * ld;
        DIT_OMP_SIMD
        for (int64_t i = 0; i < bq; ++i) s[i] += kv * q[i];
      }
      for (int64_t i = 0; i < bq; ++i) bmax[i] = std::max(bmax[i], s[i]);
    }
  }

  // bmax: this block's column max (from qk); m: running max (updated), l: running sum
  // (updated), alpha: rescale factor written for Ot. S is overwritten with P = exp2(S - m_new).
  // (A NaN score need not reach the max: its exp2 is NaN, which makes l, out and lse NaN.)
  static void softmax(A* S, int64_t nk, int64_t bq, int64_t ld, const A* bmax, A* m, A* l, A* alpha) {
    for (int64_t i = 0; i < bq; ++i) {
      const A mx = std::max(m[i], bmax[i]);
      A sum = A(0);
      for (int64_t j = 0; j < nk; ++j) {
        const A e = std::exp2(S[j * ld + i] - mx);
        S[j * ld + i] = e;
        sum += e;
      }
      const A al = std::exp2(m[i] - mx);  // exp2(-inf) = 0 on the first block
      alpha[i] = al;
      l[i] = l[i] * al + sum;
      m[i] = mx;
    }
  }

  static void rescale(A* Ot, int64_t Dh, int64_t bq, int64_t ld, const A* alpha) {
    for (int64_t d = 0; d < Dh; ++d) {
      A* o = Ot + d * ld;
      DIT_OMP_SIMD
      for (int64_t i = 0; i < bq; ++i) o[i] *= alpha[i];
    }
  }

  static void pv(const A* v, int64_t ldv, int64_t nk, const A* P, int64_t bq, int64_t ld, int64_t Dh,
                 A* Ot) {
    for (int64_t j = 0; j < nk; ++j) {
      const A* p = P + j * ld;
      const A* vr = v + j * ldv;
      for (int64_t d = 0; d < Dh; ++d) {
        const A vv = vr[d];
        A* o = Ot + d * ld;
        DIT_OMP_SIMD
        for (int64_t i = 0; i < bq; ++i) o[i] += vv * p[i];
      }
    }
  }
};

// ---- block routines: AVX2 + FMA (fp32) ----------------------------------------------------------

#if DIT_CPU_HAVE_AVX2_PATH

// 2^x for x <= 0 (and moderate positive x): round-to-nearest split x = k + f, |f| <= 1/2, and a
// degree-6 near-minimax polynomial for 2^f (approximation error 2e-9 relative; about 1 ulp after
// fp32 evaluation). Inputs below -126 give 2^-126-ish (negligible in the callers' sums); NaN
// propagates.
DIT_TARGET_AVX2 static inline __m256 exp2_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-126.0f), x);  // NaN in x is returned (second operand)
  x = _mm256_min_ps(_mm256_set1_ps(127.0f), x);
  const __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, k);
  __m256 p = _mm256_set1_ps(1.5346249935242577e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399934981214272e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618487331010714e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328765254266e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646905627631e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472057445258e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.000000000552155f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// S[r][0:16] = sum_d k[r][d] * Qt[d][0:16] for r < R; mx0/mx1 = running column max.
template <int R>
DIT_TARGET_AVX2 static inline void qk_tile(const float* k, int64_t ldk, const float* qt,
                                           int64_t ld, int64_t Dh, float* s, __m256& mx0,
                                           __m256& mx1) {
  __m256 acc0[R], acc1[R];
  DIT_UNROLL_R
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < Dh; ++d) {
    const __m256 q0 = _mm256_loadu_ps(qt + d * ld);
    const __m256 q1 = _mm256_loadu_ps(qt + d * ld + 8);
    DIT_UNROLL_R
    for (int r = 0; r < R; ++r) {
      const __m256 kb = _mm256_broadcast_ss(k + r * ldk + d);
      acc0[r] = _mm256_fmadd_ps(kb, q0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(kb, q1, acc1[r]);
    }
  }
  DIT_UNROLL_R
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(s + r * ld, acc0[r]);
    _mm256_storeu_ps(s + r * ld + 8, acc1[r]);
    mx0 = _mm256_max_ps(mx0, acc0[r]);
    mx1 = _mm256_max_ps(mx1, acc1[r]);
  }
}

// Ot[r][0:16] += sum_j v[j][r] * P[j][0:16] for r < R (v points at column d0 of key row 0).
template <int R>
DIT_TARGET_AVX2 static inline void pv_tile(const float* v, int64_t ldv, int64_t nk,
                                           const float* p, int64_t ld, float* ot) {
  __m256 acc0[R], acc1[R];
  DIT_UNROLL_R
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm256_loadu_ps(ot + r * ld);
    acc1[r] = _mm256_loadu_ps(ot + r * ld + 8);
  }
  for (int64_t j = 0; j < nk; ++j) {
    const __m256 p0 = _mm256_loadu_ps(p + j * ld);
    const __m256 p1 = _mm256_loadu_ps(p + j * ld + 8);
    const float* vr = v + j * ldv;
    DIT_UNROLL_R
    for (int r = 0; r < R; ++r) {
      const __m256 vb = _mm256_broadcast_ss(vr + r);
      acc0[r] = _mm256_fmadd_ps(vb, p0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(vb, p1, acc1[r]);
    }
  }
  DIT_UNROLL_R
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(ot + r * ld, acc0[r]);
    _mm256_storeu_ps(ot + r * ld + 8, acc1[r]);
  }
}

constexpr int kRows = 6;  // rows per tile: 12 accumulators + 2 operands + 1 broadcast <= 16 ymm

struct Avx2Blocks {
  DIT_TARGET_AVX2 static void qk(const float* k, int64_t ldk, int64_t nk, const float* qt,
                                 int64_t bq, int64_t ld, int64_t Dh, float* S, float* bmax) {
    for (int64_t ic = 0; ic < bq; ic += kIC) {
      __m256 mx0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      __m256 mx1 = mx0;
      int64_t j = 0;
      for (; j + kRows <= nk; j += kRows)
        qk_tile<kRows>(k + j * ldk, ldk, qt + ic, ld, Dh, S + j * ld + ic, mx0, mx1);
      const float* kj = k + j * ldk;
      const float* q = qt + ic;
      float* sj = S + j * ld + ic;
      switch (nk - j) {
        case 5: qk_tile<5>(kj, ldk, q, ld, Dh, sj, mx0, mx1); break;
        case 4: qk_tile<4>(kj, ldk, q, ld, Dh, sj, mx0, mx1); break;
        case 3: qk_tile<3>(kj, ldk, q, ld, Dh, sj, mx0, mx1); break;
        case 2: qk_tile<2>(kj, ldk, q, ld, Dh, sj, mx0, mx1); break;
        case 1: qk_tile<1>(kj, ldk, q, ld, Dh, sj, mx0, mx1); break;
        default: break;
      }
      _mm256_storeu_ps(bmax + ic, mx0);
      _mm256_storeu_ps(bmax + ic + 8, mx1);
    }
  }

  DIT_TARGET_AVX2 static void softmax(float* S, int64_t nk, int64_t bq, int64_t ld,
                                      const float* bmax,
                                      float* m, float* l, float* alpha) {
    for (int64_t i = 0; i < bq; i += 8) {
      const __m256 m_old = _mm256_loadu_ps(m + i);
      const __m256 mx = _mm256_max_ps(m_old, _mm256_loadu_ps(bmax + i));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < nk; ++j) {
        const __m256 e = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(S + j * ld + i), mx));
        _mm256_storeu_ps(S + j * ld + i, e);
        sum = _mm256_add_ps(sum, e);
      }
      // First block: m_old = -inf -> alpha ~ 2^-126, multiplying l = 0 and Ot = 0.
      const __m256 al = exp2_avx2(_mm256_sub_ps(m_old, mx));
      _mm256_storeu_ps(alpha + i, al);
      _mm256_storeu_ps(l + i, _mm256_fmadd_ps(_mm256_loadu_ps(l + i), al, sum));
      _mm256_storeu_ps(m + i, mx);
    }
  }

  DIT_TARGET_AVX2 static void rescale(float* Ot, int64_t Dh, int64_t bq, int64_t ld,
                                      const float* alpha) {
    for (int64_t d = 0; d < Dh; ++d) {
      float* o = Ot + d * ld;
      for (int64_t i = 0; i < bq; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), _mm256_loadu_ps(alpha + i)));
    }
  }

  DIT_TARGET_AVX2 static void pv(const float* v, int64_t ldv, int64_t nk, const float* P,
                                 int64_t bq, int64_t ld, int64_t Dh, float* Ot) {
    for (int64_t ic = 0; ic < bq; ic += kIC) {
      int64_t d = 0;
      for (; d + kRows <= Dh; d += kRows) pv_tile<kRows>(v + d, ldv, nk, P + ic, ld, Ot + d * ld + ic);
      const float* vd = v + d;
      float* od = Ot + d * ld + ic;
      switch (Dh - d) {
        case 5: pv_tile<5>(vd, ldv, nk, P + ic, ld, od); break;
        case 4: pv_tile<4>(vd, ldv, nk, P + ic, ld, od); break;
        case 3: pv_tile<3>(vd, ldv, nk, P + ic, ld, od); break;
        case 2: pv_tile<2>(vd, ldv, nk, P + ic, ld, od); break;
        case 1: pv_tile<1>(vd, ldv, nk, P + ic, ld, od); break;
        default: break;
      }
    }
  }
};

#endif  // DIT_CPU_HAVE_AVX2_PATH

// ---- one work item ------------------------------------------------------------------------------

struct FwdArgs {
  const void* qkv;
  int64_t sn, st;  // qkv strides along N and T
  void* out;
  void* lse;
  int64_t N, T, H, Dh;
  double scale;
};

template <typename A>
struct Scratch {
  std::vector<A> qt, ot, s, m, l, alpha, bmax, kp, vp;
  Scratch(int64_t Dh, bool widen)
      : qt(Dh * (kBQ + kPad)), ot(Dh * (kBQ + kPad)), s(kBK * (kBQ + kPad)), m(kBQ), l(kBQ),
        alpha(kBQ), bmax(kBQ), kp(widen ? kBK * Dh : 0), vp(widen ? kBK * Dh : 0) {}
};

template <typename T, typename A, class Blocks>
void fwd_item(const FwdArgs& a, int64_t item, Scratch<A>& sc) {
  const int64_t T_ = a.T, H = a.H, Dh = a.Dh, D = H * Dh;
  const int64_t nqb = (T_ + kBQ - 1) / kBQ;
  const int64_t qb = item % nqb;
  const int64_t nh = item / nqb;
  const int64_t h = nh % H, n = nh / H;
  const int64_t i0 = qb * kBQ;
  const int64_t nq = std::min(kBQ, T_ - i0);
  const int64_t bq = (nq + kIC - 1) / kIC * kIC;
  const int64_t ld = bq + kPad;

  const T* base = static_cast<const T*>(a.qkv) + n * a.sn + h * Dh;
  const T* qp = base + i0 * a.st;
  const T* kbase = base + D;
  const T* vbase = base + 2 * D;

  A* qt = sc.qt.data();
  A* ot = sc.ot.data();
  A* S = sc.s.data();
  A* m = sc.m.data();
  A* l = sc.l.data();
  const A c = static_cast<A>(a.scale * kLog2e);
  for (int64_t d = 0; d < Dh; ++d) {
    A* row = qt + d * ld;
    for (int64_t i = 0; i < nq; ++i) row[i] = to_acc(qp[i * a.st + d]) * c;
    for (int64_t i = nq; i < bq; ++i) row[i] = A(0);
  }
  std::fill(ot, ot + Dh * ld, A(0));
  std::fill(m, m + bq, -std::numeric_limits<A>::infinity());
  std::fill(l, l + bq, A(0));

  for (int64_t j0 = 0; j0 < T_; j0 += kBK) {
    const int64_t nk = std::min(kBK, T_ - j0);
    const A* kr;
    const A* vr;
    int64_t ldkv;
    if constexpr (std::is_same<T, A>::value) {
      kr = kbase + j0 * a.st;
      vr = vbase + j0 * a.st;
      ldkv = a.st;
    } else {  // widen this key block's k and v rows
      A* kp = sc.kp.data();
      A* vp = sc.vp.data();
      for (int64_t j = 0; j < nk; ++j) {
        const T* ks = kbase + (j0 + j) * a.st;
        const T* vs = vbase + (j0 + j) * a.st;
        DIT_OMP_SIMD
        for (int64_t d = 0; d < Dh; ++d) {
          kp[j * Dh + d] = to_acc(ks[d]);
          vp[j * Dh + d] = to_acc(vs[d]);
        }
      }
      kr = kp;
      vr = vp;
      ldkv = Dh;
    }
    Blocks::qk(kr, ldkv, nk, qt, bq, ld, Dh, S, sc.bmax.data());
    Blocks::softmax(S, nk, bq, ld, sc.bmax.data(), m, l, sc.alpha.data());
    if (j0 > 0) Blocks::rescale(ot, Dh, bq, ld, sc.alpha.data());
    Blocks::pv(vr, ldkv, nk, S, bq, ld, Dh, ot);
  }

  T* out = static_cast<T*>(a.out) + (n * T_ + i0) * D + h * Dh;
  A* lse = static_cast<A*>(a.lse) + (n * H + h) * T_ + i0;
  for (int64_t i = 0; i < nq; ++i) {
    const A inv = A(1) / l[i];
    T* orow = out + i * D;
    for (int64_t d = 0; d < Dh; ++d) from_acc(ot[d * ld + i] * inv, orow + d);
    lse[i] = (m[i] + std::log2(l[i])) * static_cast<A>(kLn2);
  }
}

template <typename T, class Blocks>
void fwd_driver(const FwdArgs& a, int num_threads) {
  using A = typename AccOf<T>::type;
  const int64_t nqb = (a.T + kBQ - 1) / kBQ;
  const int64_t items = a.N * a.H * nqb;
  const bool widen = !std::is_same<T, A>::value;
#ifdef _OPENMP
  const int nt = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(num_threads > 0 ? num_threads : omp_get_max_threads(), items)));
#pragma omp parallel num_threads(nt)
#endif
  {
    Scratch<A> sc(a.Dh, widen);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) fwd_item<T, A, Blocks>(a, item, sc);
  }
  (void)num_threads;
}

template <typename T>
void fwd_dispatch(const FwdArgs& a, int num_threads) {
  using A = typename AccOf<T>::type;
#if DIT_CPU_HAVE_AVX2_PATH
  if constexpr (std::is_same<A, float>::value) {
    if (active_isa() == Isa::kAvx2) return fwd_driver<T, Avx2Blocks>(a, num_threads);
  }
#endif
  fwd_driver<T, GenericBlocks<A>>(a, num_threads);
}

}  // namespace

Status attention_fwd(DType dtype, const void* qkv, int64_t qkv_stride_n, int64_t qkv_stride_t,
                     void* out, void* lse, int64_t N, int64_t T, int64_t H, int64_t Dh,
                     double scale, int num_threads) {
  if (N < 0 || T < 0 || H < 0 || Dh < 0 || qkv_stride_n < 0 || qkv_stride_t < 0)
    return Status::kInvalidArgument;
  if (N * T * H == 0) return Status::kOk;
  if (Dh == 0) return Status::kInvalidArgument;
  const FwdArgs a{qkv, qkv_stride_n, qkv_stride_t, out, lse, N, T, H, Dh, scale};
  switch (dtype) {
    case DType::kFloat32: fwd_dispatch<float>(a, num_threads); return Status::kOk;
    case DType::kFloat64: fwd_dispatch<double>(a, num_threads); return Status::kOk;
    case DType::kBFloat16: fwd_dispatch<bf16>(a, num_threads); return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace cpu
}  // namespace dit_fast
