// Shared math of DiT's sinusoidal timestep embedding (TimestepEmbedder.timestep_embedding, from
// GLIDE), used by csrc/cpu/timestep_embed.cpp and csrc/cuda/timestep_embed.cu:
//
//   half = dim / 2,  freqs[i] = exp(-log(max_period) * i / half)      (float32, i < half)
//   args[n, i] = float(t[n]) * freqs[i]                                (one float32 multiply)
//   emb[n, :]  = [cos(args[n, :]), sin(args[n, :]), 0 if dim is odd]
//
// The frequency table does not depend on t; it is computed once by PyTorch with the official
// expression (so it is bit-identical to the official code on the same device) and passed in.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace dit_fast {
namespace timestep_embed {

DIT_HD_FI float cos_(float v) {
#if defined(__CUDA_ARCH__)
  return cosf(v);  // full-range, accurate (not __cosf)
#else
  return std::cos(v);
#endif
}
DIT_HD_FI float sin_(float v) {
#if defined(__CUDA_ARCH__)
  return sinf(v);
#else
  return std::sin(v);
#endif
}
DIT_HD_FI float mul_(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Writes (cos(arg), sin(arg)) of arg = t * freq.
DIT_HD_FI void embed_pair(float t, float freq, float& c, float& s) {
  const float arg = mul_(t, freq);
  c = cos_(arg);
  s = sin_(arg);
}

}  // namespace timestep_embed
}  // namespace dit_fast
