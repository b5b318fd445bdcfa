// Torch-free CPU kernel: the fused diffusion sampler step (DDPM / DDIM, epsilon prediction,
// optional classifier-free guidance combine). Math and coefficient layout: common/sampler_step.h.
//
// Layouts (contiguous):
//   model_out : (Bm, Cm, S), Bm = N (2N with guidance: conditional half first), Cm = C or 2C
//               (eps channels [0, C), learned-range variance channels [C, 2C))
//   x, noise  : (N, C, S); noise may be null (no noise term)
//   coefs     : (N, 8) accumulator type (float, double for float64 data)
//   sample, pred_xstart : (N, C, S) accumulator type (float32 / float64), like the unfused code
// Dtype combinations (m_dtype, x_dtype): {float32, bfloat16} x {float32, bfloat16}, or
// (float64, float64). noise has x's dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status sampler_step(int mode, DType m_dtype, const void* model_out, int64_t m_batch,
                    int64_t m_channels, DType x_dtype, const void* x, const void* noise,
                    const void* coefs, void* sample, void* pred_xstart, int64_t N, int64_t C,
                    int64_t S, bool clip, bool guided, double cfg_scale, int64_t guide_channels,
                    int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
