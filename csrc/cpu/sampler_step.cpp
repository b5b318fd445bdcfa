// CPU implementation of the fused sampler step (see cpu/sampler_step.h, common/sampler_step.h).
//
// One pass over the (n, c) rows of S elements, OpenMP over rows. The per-element math reproduces
// the unfused PyTorch code's rounding, so floating-point contraction (a*b+c -> fma) must be off in
// this translation unit; the pragmas below make sure of it whatever the build flags say.

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")  // no-trapping-math: lets the
// selects in exp_vec vectorize; it does not change any result (only floating-point exception flags)
#endif

#include "cpu/sampler_step.h"

#include <type_traits>

#include "common/bf16.h"
#include "common/sampler_step.h"
#include "cpu/embed_common.h"
#include "cpu/isa.h"

namespace dit_fast {
namespace cpu {
namespace {

namespace sm = ::dit_fast::sampler;
using embed::to_acc;

struct Args {
  int mode;
  const void* m;
  int64_t m_channels;
  const void* x;
  const void* noise;
  const void* coefs;
  void* sample;
  void* pred;
  int64_t N, C, S;
  bool clip, guided;
  double cfg_scale;
  int64_t guide_channels;
};

template <typename Tm>
using RoundOf = typename std::conditional<std::is_same<Tm, bf16>::value, sm::RoundBf16,
                                          sm::RoundNone>::type;

// exp(x) for float, branch-free so that loops over it vectorize (the C library's expf does not):
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6 polynomial for e^r.
// Measured: <= 1 ulp from the correctly rounded result for normal outputs (max relative error
// 8e-8), like PyTorch's vectorized exp, so fused and unfused steps agree to ~1 ulp on the noise
// term. Underflows to 0 below -103.97 (subnormal results in between), overflows to inf above
// 88.72; NaN stays NaN.
DIT_FORCEINLINE float exp_vec(float x) {
  const float xc = x < -103.97208f ? -103.97208f : (x > 88.72283f ? 88.72283f : x);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // y * 2^n, with n in [-126, 128] split in two steps so that both scale factors are normal
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni / 2, n2 = ni - n1;
  const float s1 = bits_as_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_as_float(static_cast<uint32_t>(n2 + 127) << 23);
  const float out = (y * s1) * s2;
  const float big = x > 88.72283f ? bits_as_float(0x7F800000u) : out;  // overflow -> inf
  const float res = x < -103.97208f ? 0.0f : big;                         // underflow -> 0
  return x != x ? x : res;
}
DIT_FORCEINLINE double exp_vec(double x) { return std::exp(x); }

constexpr int kChunk = 64;  // elements per pass of the row loops (stack buffers)

// One (n, c) row of S elements, in chunks, each a few simple loops the compiler vectorizes.
template <typename Tm, typename Tx, typename A, int kMode, bool kClip, bool kNoise>
DIT_FORCEINLINE void row_impl(const Args& a, int64_t row) {
  using R = RoundOf<Tm>;
  const int64_t n = row / a.C, c = row - n * a.C, S = a.S;
  const Tm* m = static_cast<const Tm*>(a.m);
  const Tm* eps_c = m + (n * a.m_channels + c) * S;
  const bool guide = a.guided && c < a.guide_channels;
  const Tm* eps_u = guide ? m + ((a.N + n) * a.m_channels + c) * S : nullptr;
  const Tm* var = m + (n * a.m_channels + a.C + c) * S;  // read only in learned-range mode
  const Tx* x = static_cast<const Tx*>(a.x) + row * S;
  const Tx* noise = kNoise ? static_cast<const Tx*>(a.noise) + row * S : nullptr;
  const A* k = static_cast<const A*>(a.coefs) + n * sm::kNumCoefs;
  A* out = static_cast<A*>(a.sample) + row * S;
  A* pred = static_cast<A*>(a.pred) + row * S;
  const A scale = static_cast<A>(a.cfg_scale);
  const A c0 = k[0], c1 = k[1], c2 = k[2], c3 = k[3], c4 = k[4], c5 = k[5], c6 = k[6];
  alignas(64) A e[kChunk], xv[kChunk], px[kChunk], lv[kChunk];
  for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
    const int len = static_cast<int>(S - s0 < kChunk ? S - s0 : kChunk);
    DIT_OMP_SIMD
    for (int i = 0; i < len; ++i) e[i] = to_acc<A>(eps_c[s0 + i]);
    if (guide) {
      DIT_OMP_SIMD
      for (int i = 0; i < len; ++i) e[i] = sm::guide<A, R>(e[i], to_acc<A>(eps_u[s0 + i]), scale);
    }
    DIT_OMP_SIMD
    for (int i = 0; i < len; ++i) {
      xv[i] = to_acc<A>(x[s0 + i]);
      px[i] = sm::pred_xstart<A>(xv[i], e[i], c0, c1, kClip);
      pred[s0 + i] = px[i];
    }
    if constexpr (kMode == sm::kDdim) {
      if constexpr (kNoise) {
        DIT_OMP_SIMD
        for (int i = 0; i < len; ++i)
          out[s0 + i] = sm::ddim_sample<A>(xv[i], px[i], c0, c1, c2, c3, c6, to_acc<A>(noise[s0 + i]));
      } else {
        DIT_OMP_SIMD
        for (int i = 0; i < len; ++i) out[s0 + i] = sm::ddim_mean<A>(xv[i], px[i], c0, c1, c2, c3);
      }
    } else if constexpr (kNoise) {
      if constexpr (kMode == sm::kDdpmLearnedRange) {
        DIT_OMP_SIMD
        for (int i = 0; i < len; ++i)
          lv[i] = sm::learned_log_variance<A, R>(to_acc<A>(var[s0 + i]), c4, c5);
      } else {
        for (int i = 0; i < len; ++i) lv[i] = c4;
      }
      DIT_OMP_SIMD
      for (int i = 0; i < len; ++i) {
        const A mean = sm::ddpm_mean<A>(xv[i], px[i], c2, c3);
        const A sd = sm::mul_(c6, exp_vec(sm::mul_(A(0.5), lv[i])));
        out[s0 + i] = sm::add_(mean, sm::mul_(sd, to_acc<A>(noise[s0 + i])));
      }
    } else {
      DIT_OMP_SIMD
      for (int i = 0; i < len; ++i) out[s0 + i] = sm::ddpm_mean<A>(xv[i], px[i], c2, c3);
    }
  }
}

template <typename Tm, typename Tx, typename A, int kMode, bool kClip, bool kNoise>
void row_generic(const Args& a, int64_t row) {
  row_impl<Tm, Tx, A, kMode, kClip, kNoise>(a, row);
}
#if DIT_CPU_HAVE_AVX2_PATH
// fp-contract is off in this file, so the AVX2 clone rounds exactly like the generic one.
template <typename Tm, typename Tx, typename A, int kMode, bool kClip, bool kNoise>
DIT_TARGET_AVX2 void row_avx2(const Args& a, int64_t row) {
  row_impl<Tm, Tx, A, kMode, kClip, kNoise>(a, row);
}
#endif

using RowFn = void (*)(const Args&, int64_t);

template <typename Tm, typename Tx, typename A, int kMode, bool kClip, bool kNoise>
RowFn pick_isa() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &row_avx2<Tm, Tx, A, kMode, kClip, kNoise>;
#endif
  return &row_generic<Tm, Tx, A, kMode, kClip, kNoise>;
}

template <typename Tm, typename Tx, typename A, int kMode>
RowFn pick_flags(bool clip, bool noise) {
  if (clip) return noise ? pick_isa<Tm, Tx, A, kMode, true, true>() : pick_isa<Tm, Tx, A, kMode, true, false>();
  return noise ? pick_isa<Tm, Tx, A, kMode, false, true>() : pick_isa<Tm, Tx, A, kMode, false, false>();
}

template <typename Tm, typename Tx, typename A>
void drive(const Args& a, int num_threads) {
  RowFn fn;
  const bool noise = a.noise != nullptr;
  switch (a.mode) {
    case sm::kDdpmLearnedRange: fn = pick_flags<Tm, Tx, A, sm::kDdpmLearnedRange>(a.clip, noise); break;
    case sm::kDdpmFixed: fn = pick_flags<Tm, Tx, A, sm::kDdpmFixed>(a.clip, noise); break;
    default: fn = pick_flags<Tm, Tx, A, sm::kDdim>(a.clip, noise); break;
  }
  const int64_t rows = a.N * a.C;
  const int nt = embed::resolve_threads(num_threads, rows, rows * a.S * 8);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t r = 0; r < rows; ++r) fn(a, r);
  (void)nt;
}

}  // namespace

Status sampler_step(int mode, DType m_dtype, const void* model_out, int64_t m_batch,
                    int64_t m_channels, DType x_dtype, const void* x, const void* noise,
                    const void* coefs, void* sample, void* pred_xstart, int64_t N, int64_t C,
                    int64_t S, bool clip, bool guided, double cfg_scale, int64_t guide_channels,
                    int num_threads) {
  if (mode < sm::kDdpmLearnedRange || mode > sm::kDdim) return Status::kInvalidArgument;
  if (N < 0 || C < 0 || S < 0) return Status::kInvalidArgument;
  if (m_batch != (guided ? 2 * N : N)) return Status::kInvalidArgument;
  if (m_channels < C || (mode == sm::kDdpmLearnedRange && m_channels < 2 * C))
    return Status::kInvalidArgument;
  if (guided && (guide_channels < 0 || guide_channels > C)) return Status::kInvalidArgument;
  if (N * C * S == 0) return Status::kOk;
  const Args a{mode, model_out, m_channels, x, noise, coefs, sample, pred_xstart, N, C, S,
               clip, guided, cfg_scale, guide_channels};
  using D = DType;
  if (m_dtype == D::kFloat64 || x_dtype == D::kFloat64) {
    if (m_dtype != D::kFloat64 || x_dtype != D::kFloat64) return Status::kUnsupportedDType;
    drive<double, double, double>(a, num_threads);
    return Status::kOk;
  }
  if (m_dtype == D::kFloat32 && x_dtype == D::kFloat32) {
    drive<float, float, float>(a, num_threads);
  } else if (m_dtype == D::kFloat32 && x_dtype == D::kBFloat16) {
    drive<float, bf16, float>(a, num_threads);
  } else if (m_dtype == D::kBFloat16 && x_dtype == D::kFloat32) {
    drive<bf16, float, float>(a, num_threads);
  } else if (m_dtype == D::kBFloat16 && x_dtype == D::kBFloat16) {
    drive<bf16, bf16, float>(a, num_threads);
  } else {
    return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace cpu
}  // namespace dit_fast
