// AVX2 + FMA GELU(tanh) of 8 fp32 lanes: forward and derivative, the vector form of
// common/gelu.h (same clamp and flush-to-zero rules; exp from cpu/vec_avx2.h, ~1.5 ulp; exact
// division for the sigmoid). Shared by the bias + GELU kernel (gelu.cpp) and the packed GEMM's
// GELU epilogue (gemm.cpp), so both give identical results. Only meaningful where
// DIT_CPU_HAVE_AVX2_PATH is 1; callers must be AVX2 clones.
#pragma once

#include "cpu/isa.h"

#if DIT_CPU_HAVE_AVX2_PATH

#include <immintrin.h>

#include "common/gelu.h"
#include "cpu/vec_avx2.h"

namespace dit_fast {
namespace cpu {
namespace avx2 {

#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))

// a = -2u, e = exp(clamp(a)), s = sigmoid(2u) flushed to 0 where a >= clamp (common/gelu.h).
struct Sig8 {
  __m256 a, e, s;
};
DIT_AVX2_FI Sig8 sig8(__m256 v) {
  const __m256 v2 = _mm256_mul_ps(v, v);
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(static_cast<float>(gelu::kKappa)), v2), v, v);
  const __m256 a = _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(-2.0 * gelu::kBeta)), inner);
  const __m256 c = _mm256_set1_ps(gelu::kExpClampF);
  const __m256 ac = _mm256_min_ps(_mm256_max_ps(a, _mm256_sub_ps(_mm256_setzero_ps(), c)), c);
  const __m256 e = exp8(ac);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
  s = _mm256_andnot_ps(_mm256_cmp_ps(a, c, _CMP_GE_OQ), s);
  return {a, e, s};
}

DIT_AVX2_FI __m256 gelu8(__m256 v) { return _mm256_mul_ps(v, sig8(v).s); }

// gelu::grad_from: 0 where a >= c, 1 where a <= -c, else s + 2 beta ((e s) s) v (1 + 3 kappa v^2).
DIT_AVX2_FI __m256 grad8(__m256 v) {
  const Sig8 q = sig8(v);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 c = _mm256_set1_ps(gelu::kExpClampF);
  const __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(3.0 * gelu::kKappa)),
                                      _mm256_mul_ps(v, v), one);
  const __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(q.e, q.s), q.s), v), poly);
  __m256 g = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(2.0 * gelu::kBeta)), t, q.s);
  g = _mm256_blendv_ps(g, one, _mm256_cmp_ps(q.a, _mm256_sub_ps(_mm256_setzero_ps(), c), _CMP_LE_OQ));
  return _mm256_andnot_ps(_mm256_cmp_ps(q.a, c, _CMP_GE_OQ), g);
}

#undef DIT_AVX2_FI

}  // namespace avx2
}  // namespace cpu
}  // namespace dit_fast

#endif  // DIT_CPU_HAVE_AVX2_PATH
