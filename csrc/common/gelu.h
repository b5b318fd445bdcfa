// Shared math for GELU (tanh approximation, exactly torch.nn.GELU(approximate="tanh")) fused with
// the preceding bias add (DiT's fc1 bias):
//
//   v   = h + bias
//   u   = sqrt(2/pi) * (v + 0.044715 v^3)
//   out = 0.5 v (1 + tanh(u)) = v * sigmoid(2u) = v / (1 + exp(-2u))
//
// The sigmoid form needs one exp and one division and has no cancellation: 1 + tanh(u) is never
// formed. Its derivative, with s = sigmoid(2u) and e = exp(-2u) (so 1 - s = e s):
//
//   d out / dv = s + 2 v s (1 - s) du/dv = s + 2 v e s^2 sqrt(2/pi) (1 + 3 * 0.044715 v^2)
//
// (torch writes the same derivative as 0.5 (1 + t) + 0.5 v (1 - t^2) du/dv with t = tanh(u);
// 1 - t^2 = 4 s (1 - s).) The exp argument is clamped to +-kExpClamp so e stays finite (e s^2 is
// never inf * 0), and s is flushed to 0 where -2u >= kExpClamp (v < -9.3 in fp32), where the exact
// s is already below the smallest normal float.
//
// Used by csrc/cpu/gelu.cpp (whose AVX2 path evaluates the same formulas with a vectorized exp,
// csrc/cpu/vec_avx2.h) and csrc/cuda/gelu.cu.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace dit_fast {
namespace gelu {

constexpr double kBeta = 0.79788456080286535587989211986876;  // sqrt(2 / pi) (torch's kBeta)
constexpr double kKappa = 0.044715;
constexpr float kExpClampF = 87.0f;  // exp(87) = 6.1e37 < FLT_MAX
constexpr double kExpClampD = 700.0;
DIT_HD_FI float exp_clamp(float) { return kExpClampF; }
DIT_HD_FI double exp_clamp(double) { return kExpClampD; }

DIT_HD_FI float exp_acc(float a) { return expf(a); }
DIT_HD_FI double exp_acc(double a) { return exp(a); }

// -2u, the argument of the exp.
template <typename A>
DIT_HD_FI A neg_two_u(A v) {
  return A(-2.0 * kBeta) * (v + A(kKappa) * v * v * v);
}

// e = exp(a) with a clamped to [-c, c] (c = exp_clamp): finite for every finite a; NaN stays NaN.
template <typename A>
DIT_HD_FI A exp_clamped(A a) {
  const A c = exp_clamp(A(0));
  return exp_acc(a < -c ? -c : (a > c ? c : a));
}

// s = sigmoid(2u) = 1 / (1 + e), flushed to exactly 0 where a = -2u >= c (true value < 1e-37; so
// gelu(v) is exactly -0 / 0 there, like torch's 0.5 v (1 + tanh(u)) = 0.5 v (1 - 1)).
template <typename A>
DIT_HD_FI A sigmoid_from_e(A a, A e) {
  return a >= exp_clamp(A(0)) ? A(0) : A(1) / (A(1) + e);
}

// gelu_tanh(v).
template <typename A>
DIT_HD_FI A forward(A v) {
  const A a = neg_two_u(v);
  return v * sigmoid_from_e(a, exp_clamped(a));
}

// d gelu_tanh / dv from v, a = -2u, e = exp_clamped(a) and s = sigmoid_from_e(a, e): exactly 0
// where s is flushed (a >= c) and exactly 1 where a <= -c (there the true correction term is
// below 1e-30; evaluating it from the clamped e could overflow). In between |v| < 10, so nothing
// overflows; (e s) s is formed first (e s = 1 - s <= 1).
template <typename A>
DIT_HD_FI A grad_from(A v, A a, A e, A s) {
  const A c = exp_clamp(A(0));
  const A mid = s + A(2.0 * kBeta) * ((e * s) * s) * v * (A(1) + A(3.0 * kKappa) * v * v);
  return a >= c ? A(0) : (a <= -c ? A(1) : mid);
}

// d gelu_tanh / dv.
template <typename A>
DIT_HD_FI A grad(A v) {
  const A a = neg_two_u(v);
  const A e = exp_clamped(a);
  return grad_from(v, a, e, sigmoid_from_e(a, e));
}

}  // namespace gelu
}  // namespace dit_fast
