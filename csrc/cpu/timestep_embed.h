// Torch-free CPU kernel: DiT's sinusoidal timestep embedding (see common/timestep_embed.h).
//
//   t     : (N,) timesteps, dtype t_dtype (float32 / float64 / int32 / int64), any element stride
//   freqs : (half,) float32, half = dim / 2 (the official frequency table)
//   out   : (N, dim) contiguous, dtype out_dtype (float32, bfloat16 or float64; the float32
//           embedding rounded to it): [cos(t * freqs), sin(t * freqs), 0 if dim is odd]
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

enum class IndexDType : int { kFloat32 = 0, kFloat64 = 1, kInt32 = 2, kInt64 = 3 };

Status timestep_embedding(IndexDType t_dtype, const void* t, int64_t t_stride, const float* freqs,
                          DType out_dtype, void* out, int64_t N, int64_t dim, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
