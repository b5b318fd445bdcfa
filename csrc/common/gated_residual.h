// Shared math for DiT's gated residual update, alone and fused with the next LayerNorm-modulate:
//
//   x_new = x + gate[n] * y                                        (gated_residual)
//   h     = LN(x_new) * (1 + scale[n]) + shift[n]                   (+ ln_modulate, fused)
//
// x, y, x_new, h: (N, T, D); gate, shift, scale: (N, D); LN without affine, biased variance. For
// reduced-precision storage the LayerNorm is taken of x_new as stored (rounded), exactly what the
// unfused `x = x + gate * y; h = ln_modulate(x, ...)` computes, and what the backward sees.
//
// Backward of the fused op, given dx_new (the gradient flowing into x_new from later uses; may be
// absent = 0) and dh, with xhat = (x_new - mean) * rstd and g = dh * (1 + scale):
//
//   dr     = dx_new + rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))   (total grad of x_new)
//   dx     = dr
//   dy     = gate * dr
//   dgate  = sum_T dr * y
//   dshift = sum_T dh
//   dscale = sum_T dh * xhat
//
// Backward of gated_residual alone: dx = dout, dy = gate * dout, dgate = sum_T dout * y.
// The LayerNorm parts reuse common/ln_modulate.h. Used by csrc/cpu/gated_residual.cpp and
// csrc/cuda/gated_residual.cu.
#pragma once

#include "common/ln_modulate.h"
#include "common/macros.h"

namespace dit_fast {
namespace gated_residual {

// x + gate * y
template <typename A>
DIT_HD_FI A residual(A x, A gate, A y) {
  return x + gate * y;
}

// Total gradient of x_new: the incoming dx_new plus the LayerNorm-modulate backward.
template <typename A>
DIT_HD_FI A grad_residual(A dx_new, A g, A xhat, A rstd, A mean_g, A mean_gx) {
  return dx_new + ::dit_fast::ln_modulate::grad_x<A>(g, xhat, rstd, mean_g, mean_gx);
}

// dy = gate * dr
template <typename A>
DIT_HD_FI A grad_y(A gate, A dr) {
  return gate * dr;
}

}  // namespace gated_residual
}  // namespace dit_fast
