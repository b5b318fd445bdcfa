// Shared per-element math of the fused diffusion sampler step (DDPM ancestral step and DDIM step,
// epsilon prediction), used by csrc/cpu/sampler_step.cpp and csrc/cuda/sampler_step.cu.
//
// The step reproduces the unfused PyTorch code of dit_fast/diffusion/gaussian_diffusion.py
// (`_p_sample_step`, `_ddim_step`) operation by operation, with the same rounding: every
// operation below is one IEEE-754 operation in the accumulator type A (float, or double for
// float64 data), and nothing may be contracted into a fused multiply-add (device code uses the
// __f*_rn intrinsics; host translation units including this header must be compiled with
// floating-point contraction off, see csrc/cpu/sampler_step.cpp). Values that PyTorch computes in
// the model's storage dtype (bfloat16 / float16 guidance and variance interpolation) are rounded to
// it with the `Round` policy.
//
// Per-sample coefficients (float32 values, as gathered by GaussianDiffusion._coef; float64 for
// float64 data), coefs[n * kNumCoefs + k]:
//   k = 0  sqrt_recip_alphas_cumprod[t]       1  sqrt_recipm1_alphas_cumprod[t]
//   DDPM: 2  posterior_mean_coef1[t]          3  posterior_mean_coef2[t]
//         4  min_log = posterior_log_variance_clipped[t] (learned range) or the fixed log variance
//         5  max_log = log(betas)[t] (learned range only)
//   DDIM: 2  sqrt(alphas_cumprod_prev[t])     3  sqrt(1 - alphas_cumprod_prev[t] - sigma^2)
//   both: 6  noise coefficient: [t != 0] (DDPM) or [t != 0] * sigma (DDIM)
//
// Per element (eps = model output channel c, v = channel C + c, both of the conditional half):
//   guided eps  = u + s * (e - u)                  (classifier-free guidance, channels < G, in
//                                                    the model dtype like forward_with_cfg)
//   pred_xstart = c0 * x - c1 * eps, optionally clamped to [-1, 1]
//   DDPM:  mean = c2 * pred_xstart + c3 * x
//          frac = (v + 1) / 2;  log_var = frac * c5 + (1 - frac) * c4   (learned range)
//          log_var = c4                                                   (fixed variance)
//          sample = mean + (c6 * exp(0.5 * log_var)) * noise
//   DDIM:  eps' = (c0 * x - pred_xstart) / c1
//          sample = (pred_xstart * c2 + c3 * eps') + c6 * noise
#pragma once

#include <cmath>
#include <cstdint>

#include "common/bf16.h"
#include "common/macros.h"

namespace dit_fast {
namespace sampler {

enum Mode : int {
  kDdpmLearnedRange = 0,  // DDPM step, learned-range variance (DiT's learn_sigma=True)
  kDdpmFixed = 1,         // DDPM step, fixed variance (log variance in coefficient 4)
  kDdim = 2,              // DDIM step
};

constexpr int kNumCoefs = 8;

// ---- single IEEE operations, never contracted ------------------------------------------------

DIT_HD_FI float add_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DIT_HD_FI float sub_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DIT_HD_FI float mul_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DIT_HD_FI float div_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DIT_HD_FI float exp_(float a) {
#if defined(__CUDA_ARCH__)
  return expf(a);
#else
  return std::exp(a);
#endif
}
DIT_HD_FI double add_(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
DIT_HD_FI double sub_(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
DIT_HD_FI double mul_(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
DIT_HD_FI double div_(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
DIT_HD_FI double exp_(double a) {
#if defined(__CUDA_ARCH__)
  return ::exp(a);
#else
  return std::exp(a);
#endif
}

// ---- rounding to the model's storage dtype ---------------------------------------------------

struct RoundNone {  // float32 / float64 storage: the accumulator already is the storage type
  template <typename A>
  static DIT_HD_FI A r(A v) {
    return v;
  }
};
struct RoundBf16 {  // round to nearest even bfloat16, back to float
  static DIT_HD_FI float r(float v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }
};

// ---- the step, one element -------------------------------------------------------------------

// Classifier-free guidance of one eps value, in the model dtype (forward_with_cfg's
// `uncond + scale * (cond - uncond)`; the Python float scale is used as a float32 value).
template <typename A, typename Round>
DIT_HD_FI A guide(A cond, A uncond, A scale) {
  const A d = Round::r(sub_(cond, uncond));
  const A s = Round::r(mul_(scale, d));
  return Round::r(add_(uncond, s));
}

// x_0 from eps: c0 * x - c1 * eps, then the optional clamp to [-1, 1] (NaN stays NaN).
template <typename A>
DIT_HD_FI A pred_xstart(A x, A eps, A c0, A c1, bool clip) {
  A p = sub_(mul_(c0, x), mul_(c1, eps));
  if (clip) p = p < A(-1) ? A(-1) : (p > A(1) ? A(1) : p);
  return p;
}

// Learned-range log variance: frac = (v + 1) / 2 and 1 - frac in the model dtype (as PyTorch does
// for a reduced-precision model output), the interpolation in A.
template <typename A, typename Round>
DIT_HD_FI A learned_log_variance(A v, A min_log, A max_log) {
  const A frac = Round::r(div_(Round::r(add_(v, A(1))), A(2)));
  const A omf = Round::r(sub_(A(1), frac));
  return add_(mul_(frac, max_log), mul_(omf, min_log));
}

// DDPM: posterior mean and x_{t-1}. `noise_coef` is [t != 0].
template <typename A>
DIT_HD_FI A ddpm_sample(A x, A px, A coef1, A coef2, A log_var, A noise_coef, A noise) {
  const A mean = add_(mul_(coef1, px), mul_(coef2, x));
  const A std_ = mul_(noise_coef, exp_(mul_(A(0.5), log_var)));
  return add_(mean, mul_(std_, noise));
}
// DDPM without noise (the caller passed none): the mean.
template <typename A>
DIT_HD_FI A ddpm_mean(A x, A px, A coef1, A coef2) {
  return add_(mul_(coef1, px), mul_(coef2, x));
}

// DDIM: eps re-derived from the (possibly clipped) x_0 prediction, then eq. 12 of Song et al.
template <typename A>
DIT_HD_FI A ddim_mean(A x, A px, A c0, A c1, A sqrt_ab_prev, A eps_coef) {
  const A eps = div_(sub_(mul_(c0, x), px), c1);
  return add_(mul_(px, sqrt_ab_prev), mul_(eps_coef, eps));
}
template <typename A>
DIT_HD_FI A ddim_sample(A x, A px, A c0, A c1, A sqrt_ab_prev, A eps_coef, A noise_coef, A noise) {
  return add_(ddim_mean(x, px, c0, c1, sqrt_ab_prev, eps_coef), mul_(noise_coef, noise));
}

}  // namespace sampler
}  // namespace dit_fast
