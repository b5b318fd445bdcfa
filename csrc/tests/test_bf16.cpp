// bf16 <-> fp32 conversion: exact widening, round-to-nearest-even narrowing, inf/NaN handling.
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "common/bf16.h"
#include "tests/check.h"

using dit_fast::bf16_bits_to_float;
using dit_fast::bits_as_float;
using dit_fast::float_as_bits;
using dit_fast::float_to_bf16_bits;

// Independent reference: pick the nearer of the two bf16 neighbours in double precision,
// ties to the even mantissa.
static uint16_t ref_round(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0;  // NaN handled separately
  const uint16_t lo = static_cast<uint16_t>(u >> 16);  // truncation (toward zero in magnitude)
  if ((u & 0xFFFFu) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);    // next magnitude up (may become inf)
  const double v = f, vlo = bf16_bits_to_float(lo);
  // Past the largest finite bf16 the next candidate is "2^128" (IEEE: such values round to inf).
  double vhi = bf16_bits_to_float(hi);
  if (std::isinf(vhi)) vhi = std::copysign(std::ldexp(1.0, 128), v);
  const double dlo = std::fabs(v - vlo), dhi = std::fabs(vhi - v);
  if (dlo < dhi) return lo;
  if (dhi < dlo) return hi;
  return (lo & 1u) ? hi : lo;
}

int main() {
  // 1. Every bf16 bit pattern widens exactly and narrows back to itself (NaNs stay NaN).
  for (uint32_t b = 0; b <= 0xFFFFu; ++b) {
    const float f = bf16_bits_to_float(static_cast<uint16_t>(b));
    CHECK(float_as_bits(f) == (b << 16), "widen 0x%04x", b);
    const uint16_t back = float_to_bf16_bits(f);
    if (std::isnan(f)) {
      CHECK(std::isnan(bf16_bits_to_float(back)), "NaN 0x%04x lost", b);
      CHECK((back & 0x8000u) == (b & 0x8000u), "NaN sign 0x%04x", b);
    } else {
      CHECK(back == b, "roundtrip 0x%04x -> 0x%04x", b, back);
    }
  }
  // 2. Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> rounds to even (1.0);
  //    1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 -> rounds to even (1 + 2^-6).
  CHECK(float_to_bf16_bits(1.0f + 0x1p-8f) == 0x3F80, "tie down");
  CHECK(float_to_bf16_bits(1.0f + 3 * 0x1p-8f) == 0x3F82, "tie up");
  CHECK(float_to_bf16_bits(-(1.0f + 0x1p-8f)) == 0xBF80, "negative tie");
  CHECK(float_to_bf16_bits(1.0f + 0x1p-8f + 0x1p-20f) == 0x3F81, "above tie");
  // 3. Overflow to inf, infinities, signed zero, subnormals.
  const float fmax = std::numeric_limits<float>::max();
  CHECK(float_to_bf16_bits(fmax) == 0x7F80, "max float -> +inf");
  CHECK(float_to_bf16_bits(-fmax) == 0xFF80, "-max float -> -inf");
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::infinity()) == 0x7F80, "+inf");
  CHECK(float_to_bf16_bits(-0.0f) == 0x8000, "-0");
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000, "denorm_min");
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN()))),
        "qNaN");
  CHECK(std::isnan(bf16_bits_to_float(float_to_bf16_bits(bits_as_float(0x7F800001u)))),
        "sNaN with low payload must not become inf");
  // 4. Random floats (all exponents) against the independent reference.
  std::mt19937 rng(1234);
  for (int i = 0; i < 16000000; ++i) {
    const uint32_t u = rng();
    const float f = bits_as_float(u);
    if (std::isnan(f)) continue;
    CHECK(float_to_bf16_bits(f) == ref_round(f), "random 0x%08x: got 0x%04x want 0x%04x", u,
          float_to_bf16_bits(f), ref_round(f));
  }
  return dit_test::finish("test_bf16");
}
