// Minimal bfloat16 storage type with fp32 conversions (round-to-nearest-even), host + device.
// Layout-compatible with c10::BFloat16 and __nv_bfloat16 (one uint16_t holding the top 16 bits
// of an IEEE-754 binary32).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace dit_fast {

struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");

DIT_HD_FI uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DIT_HD_FI float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Exact: every bf16 value is a float.
DIT_HD_FI float bf16_bits_to_float(uint16_t b) { return bits_as_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest, ties to even. Overflow rounds to +-inf; NaN stays a (quiet) NaN with its sign.
// Branch-free apart from a select, so loops over it auto-vectorize.
DIT_HD_FI uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x0040u) : (rounded >> 16));
}

DIT_HD_FI float to_float(bf16 v) { return bf16_bits_to_float(v.bits); }
DIT_HD_FI bf16 to_bf16(float f) { return bf16{float_to_bf16_bits(f)}; }

}  // namespace dit_fast
