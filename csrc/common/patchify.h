// Shared index math for the patch embedding (DiT's PatchEmbed conv + pos_embed, computed as one
// GEMM over patches) and for unpatchify. Used by csrc/cpu/patchify.cpp and csrc/cuda/patchify.cu.
//
// Patch embedding, x: (N, C, H, W) contiguous, p = patch size, grid Hg = H / p, Wg = W / p,
// T = Hg * Wg tokens, K = C * p * p patch elements, weight: (D, C, p, p) = (D, K) row-major:
//
//   token  t = gh * Wg + gw                 (row-major over the patch grid, like flatten(2))
//   elem   k = (c * p + i) * p + j          (the conv weight's (C, p, p) order)
//   P[n*T + t, k] = x[n, c, gh*p + i, gw*p + j]
//   out[n, t, d]  = (sum_k P[n*T + t, k] * weight[d, k] + bias[d]) + pos[t, d]
//
// Unpatchify (the official einsum 'nhwpqc->nchpwq'), y: (N, T, p*p*C), T = Hg * Wg:
//
//   img[n, c, gh*p + i, gw*p + j] = y[n, gh*Wg + gw, (i*p + j)*C + c]
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace dit_fast {
namespace patchify {

// Offset in x (N, C, H, W) of patch element k of token t of image n.
DIT_HD_FI int64_t patch_src_offset(int64_t n, int64_t t, int64_t k, int64_t C, int64_t H,
                                   int64_t W, int64_t p, int64_t Wg) {
  const int64_t gh = t / Wg, gw = t - gh * Wg;
  const int64_t pp = p * p;
  const int64_t c = k / pp, ij = k - c * pp;
  const int64_t i = ij / p, j = ij - i * p;
  return ((n * C + c) * H + gh * p + i) * W + gw * p + j;
}

// Offset of the first element of patch row (c, i) of token t, image n: the p elements j = 0..p-1
// of that row are contiguous in x.
DIT_HD_FI int64_t patch_row_offset(int64_t n, int64_t gh, int64_t gw, int64_t c, int64_t i,
                                   int64_t C, int64_t H, int64_t W, int64_t p) {
  return ((n * C + c) * H + gh * p + i) * W + gw * p;
}

// The GEMM epilogue: conv bias, then the positional embedding (the reference's rounding order:
// conv2d(x, w, b) is rounded once, then `+ pos_embed`).
template <typename A>
DIT_HD_FI A epilogue(A acc, A bias, A pos) {
  return (acc + bias) + pos;
}

// Offset in y (N, T, p*p*C) of the value that unpatchify writes to img[n, c, h, w]
// (img: (N, C, Hg*p, Wg*p)).
DIT_HD_FI int64_t unpatchify_src_offset(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C,
                                        int64_t p, int64_t Wg, int64_t T) {
  const int64_t gh = h / p, i = h - gh * p;
  const int64_t gw = w / p, j = w - gw * p;
  return (n * T + gh * Wg + gw) * (p * p * C) + (i * p + j) * C + c;
}

}  // namespace patchify
}  // namespace dit_fast
