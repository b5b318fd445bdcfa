// Torch-free CPU kernels: DiT's patch embedding as one GEMM over patches with the conv bias and
// the positional embedding added in its epilogue, its backward, and unpatchify (see
// common/patchify.h for the index math).
//
// Layouts (element strides, all contiguous):
//   x, dx      : (N, C, H, W), H = Hg * p, W = Wg * p
//   weight, dw : (D, C, p, p) = (D, K), K = C * p * p
//   bias, db   : (D,)           (nullable: no bias / not wanted)
//   pos        : (T, D), T = Hg * Wg  (nullable: no positional embedding)
//   out, dout  : (N, T, D)
//   y, dy      : (N, T, p * p * Co);   img, dimg : (N, Co, Hg * p, Wg * p)
// Storage dtypes: float32, bfloat16 (math in fp32) and float64 (math in fp64) for the patch
// embedding; any 2-, 4- or 8-byte dtype for unpatchify (a pure permutation). Results do not depend
// on the number of threads (num_threads <= 0: OpenMP default).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dit_fast {
namespace cpu {

Status patch_embed_fwd(DType dtype, const void* x, const void* weight, const void* bias,
                       const void* pos, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t p, int64_t D, int num_threads = 0);

// Any of dx, dweight, dbias may be null (not computed).
Status patch_embed_bwd(DType dtype, const void* dout, const void* x, const void* weight, void* dx,
                       void* dweight, void* dbias, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t p, int64_t D, int num_threads = 0);

// img = unpatchify(y). elem_size: bytes per element (2, 4 or 8).
Status unpatchify_fwd(int elem_size, const void* y, void* img, int64_t N, int64_t Co, int64_t Hg,
                      int64_t Wg, int64_t p, int num_threads = 0);
// dy = the inverse permutation of dimg (unpatchify's backward = patchify in (i, j, c) order).
Status unpatchify_bwd(int elem_size, const void* dimg, void* dy, int64_t N, int64_t Co,
                      int64_t Hg, int64_t Wg, int64_t p, int num_threads = 0);

}  // namespace cpu
}  // namespace dit_fast
