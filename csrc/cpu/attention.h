// Torch-free CPU kernel: multi-head self-attention forward (FlashAttention-style, online softmax)
// reading q, k, v straight from the qkv Linear's output and writing the merged-head layout.
//
//   out[n, t, h, :] = softmax_j(scale * q[n, t, h, :] . k[n, j, h, :]) @ v[n, :, h, :]
//   lse[n, h, t]    = log sum_j exp(scale * q[n, t, h, :] . k[n, j, h, :])   (natural log)
//
// Layouts (element strides, not bytes), D = H * Dh:
//   qkv : (N, T, 3 * D); element (n, t, c) at n * qkv_stride_n + t * qkv_stride_t + c, with
//         c = which * D + h * Dh + d (which: 0 = q, 1 = k, 2 = v), i.e. the (N, T, 3, H, Dh) view
//         of a Linear's output; any N / T strides (>= 3 * D rows are not required to be packed)
//   out : (N, T, D) contiguous, same dtype as qkv
//   lse : (N, H, T) contiguous, accumulator type (float for fp32/bf16, double for fp64)
// Supported storage dtypes: float32, bfloat16 (math in fp32), float64 (math in fp64). Any head
// dim >= 1. num_threads <= 0 uses the OpenMP default. Results do not depend on the thread count.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status attention_fwd(DType dtype, const void* qkv, int64_t qkv_stride_n, int64_t qkv_stride_t,
                     void* out, void* lse, int64_t N, int64_t T, int64_t H, int64_t Dh,
                     double scale, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
