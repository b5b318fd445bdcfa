// AVX2 + FMA building blocks for the CPU kernels: 8-wide fp32 / bf16 loads and stores (bf16 stores
// round to nearest even, NaN-preserving, bit-identical to common/bf16.h), and a vectorized expf.
// Only included where DIT_CPU_HAVE_AVX2_PATH is 1; every function is compiled for avx2,fma and
// force-inlined into the DIT_TARGET_AVX2 kernel clones (callers must be AVX2 clones too).
#pragma once

#include "cpu/isa.h"

#if DIT_CPU_HAVE_AVX2_PATH

#include <immintrin.h>

#include <cstdint>

#include "common/bf16.h"

namespace dit_fast {
namespace cpu {
namespace avx2 {

#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))

DIT_AVX2_FI __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
DIT_AVX2_FI __m256 load8(const bf16* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

DIT_AVX2_FI void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
DIT_AVX2_FI void store8(bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  // rounded = u + 0x7FFF + ((u >> 16) & 1); NaN -> (u >> 16) | 0x40 (quiet, sign kept)
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                            _mm256_set1_epi32(0x7F800000));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, is_nan);  // all values < 2^16
  // Pack the 8 x 32-bit lanes to 8 x 16 bits: packus works per 128-bit half.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// exp(x) for x in [-87, 87] (callers clamp), Cephes-style: x = k ln2 + r with |r| <= ln2 / 2
// (ln2 split in two for an exact reduction), degree-7 polynomial for e^r, scale by 2^k built in
// the exponent bits. Max relative error ~1.5 ulp (checked against double in the C++ tests).
DIT_AVX2_FI __m256 exp8(__m256 x) {
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#undef DIT_AVX2_FI

}  // namespace avx2
}  // namespace cpu
}  // namespace dit_fast

#endif  // DIT_CPU_HAVE_AVX2_PATH
