// Shared row math for LayerNorm (no affine) fused with adaLN modulation:
//
//   y[n, t, :] = LN(x[n, t, :]) * (1 + scale[n, :]) + shift[n, :]
//   LN(v)      = (v - mean(v)) * rstd,  rstd = 1 / sqrt(var(v) + eps)   (biased variance)
//
// Backward, with xhat = (x - mean) * rstd and g = dy * (1 + scale) (the gradient w.r.t. xhat):
//
//   dx     = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
//   dshift = sum_T dy
//   dscale = sum_T dy * xhat
//
// Everything is computed in the accumulator type A (float for fp32/bf16/fp16 storage, double for
// fp64). Used by both csrc/cpu/ln_modulate.cpp and csrc/cuda/ln_modulate.cu.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace dit_fast {
namespace ln_modulate {

DIT_HD_FI float rsqrt_exact(float v) { return 1.0f / sqrtf(v); }
DIT_HD_FI double rsqrt_exact(double v) { return 1.0 / sqrt(v); }

// rstd from the biased variance. Correctly rounded sqrt and division (no approximate rsqrt) so
// that CPU and GPU agree closely with torch.nn.functional.layer_norm.
template <typename A>
DIT_HD_FI A rstd_from_var(A var, A eps) {
  return rsqrt_exact((var > A(0) ? var : A(0)) + eps);
}

// Corrected two-pass mean / biased variance of a contiguous row in the accumulator type
// (Chan, Golub & LeVeque): pass 1 gives m = sum(x) / D; pass 2 sums c = x - m and c^2, then
//   mean = m + sum(c) / D,   var = (sum(c^2) - sum(c)^2 / D) / D.
// The correction removes most of pass 1's rounding error from the mean (which matters when
// |mean| >> std), and there is no E[x^2] - E[x]^2 cancellation. The row is cache-resident, so the
// second pass is cheap. For D == 0 returns mean = 0, var = 0.
template <typename A>
DIT_HD_FI void finish_mean_var(A m, A sum_c, A sum_c2, int64_t D, A& mean, A& var) {
  const A inv_d = A(1) / static_cast<A>(D);
  mean = m + sum_c * inv_d;
  const A v = (sum_c2 - sum_c * sum_c * inv_d) * inv_d;
  var = v > A(0) ? v : A(0);
}

template <typename A>
DIT_HD_FI void row_mean_var(const A* x, int64_t D, A& mean, A& var) {
  if (D <= 0) {
    mean = A(0);
    var = A(0);
    return;
  }
  A sum = A(0);
  DIT_OMP_SIMD_SUM(sum)
  for (int64_t d = 0; d < D; ++d) sum += x[d];
  const A m = sum / static_cast<A>(D);
  A sc = A(0), sq = A(0);
  DIT_OMP_SIMD_SUM(sc, sq)
  for (int64_t d = 0; d < D; ++d) {
    const A c = x[d] - m;
    sc += c;
    sq += c * c;
  }
  finish_mean_var(m, sc, sq, D, mean, var);
}

// xhat = (x - mean) * rstd
template <typename A>
DIT_HD_FI A normalize(A x, A mean, A rstd) {
  return (x - mean) * rstd;
}

// DiT's modulate(): xhat * (1 + scale) + shift
template <typename A>
DIT_HD_FI A modulate(A xhat, A shift, A scale) {
  return xhat * (A(1) + scale) + shift;
}

// One output element of the fused forward.
template <typename A>
DIT_HD_FI A forward_elem(A x, A mean, A rstd, A shift, A scale) {
  return modulate(normalize(x, mean, rstd), shift, scale);
}

// Gradient w.r.t. xhat: g = dy * (1 + scale).
template <typename A>
DIT_HD_FI A grad_xhat(A dy, A scale) {
  return dy * (A(1) + scale);
}

// dx for one element, given the row means mean_g = mean_D(g) and mean_gx = mean_D(g * xhat).
template <typename A>
DIT_HD_FI A grad_x(A g, A xhat, A rstd, A mean_g, A mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}

}  // namespace ln_modulate
}  // namespace dit_fast
