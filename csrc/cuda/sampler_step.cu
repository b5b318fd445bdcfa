// CUDA kernel of the fused diffusion sampler step (DDPM / DDIM, epsilon prediction, optional
// classifier-free guidance combine). Per-element math and coefficient layout shared with the CPU
// kernel through csrc/common/sampler_step.h, whose device path uses the __f*_rn intrinsics (never
// contracted into FMAs) and expf, so results match PyTorch's unfused CUDA code operation by
// operation. One thread per element (grid-stride). Torch-free.
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/sampler_step.cu   (one line)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/sampler_step.h"
#include "cuda/embed_cuda.h"
#include "cuda/embed_io.cuh"

namespace dit_fast {
namespace cuda {
namespace {

namespace sm = ::dit_fast::sampler;
using embed::Io;
using embed::RoundTo;

struct Params {
  int mode;
  int64_t N, C, S, Cm, G;
  bool clip, guided;
  double scale;
};

template <typename Tm, typename Tx, typename A>
__global__ void sampler_step_kernel(const Tm* __restrict__ m, const Tx* __restrict__ x,
                                    const Tx* __restrict__ noise, const A* __restrict__ coefs,
                                    A* __restrict__ sample, A* __restrict__ pred, Params p) {
  using R = RoundTo<Tm>;
  const int64_t total = p.N * p.C * p.S;
  const A scale = static_cast<A>(p.scale);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.S, s = i - row * p.S;
    const int64_t n = row / p.C, c = row - n * p.C;
    const A* k = coefs + n * sm::kNumCoefs;
    A e = Io<Tm>::load(m + (n * p.Cm + c) * p.S + s);
    if (p.guided && c < p.G)
      e = sm::guide<A, R>(e, Io<Tm>::load(m + ((p.N + n) * p.Cm + c) * p.S + s), scale);
    const A xv = Io<Tx>::load(x + i);
    const A px = sm::pred_xstart<A>(xv, e, k[0], k[1], p.clip);
    pred[i] = px;
    A r;
    if (p.mode == sm::kDdim) {
      r = noise ? sm::ddim_sample<A>(xv, px, k[0], k[1], k[2], k[3], k[6], Io<Tx>::load(noise + i))
                : sm::ddim_mean<A>(xv, px, k[0], k[1], k[2], k[3]);
    } else if (noise) {
      const A lv = p.mode == sm::kDdpmLearnedRange
                       ? sm::learned_log_variance<A, R>(
                             Io<Tm>::load(m + (n * p.Cm + p.C + c) * p.S + s), k[4], k[5])
                       : k[4];
      r = sm::ddpm_sample<A>(xv, px, k[2], k[3], lv, k[6], Io<Tx>::load(noise + i));
    } else {
      r = sm::ddpm_mean<A>(xv, px, k[2], k[3]);
    }
    sample[i] = r;
  }
}

template <typename Tm, typename Tx, typename A>
cudaError_t launch(const void* m, const void* x, const void* noise, const void* coefs,
                   void* sample, void* pred, const Params& p, cudaStream_t stream) {
  sampler_step_kernel<Tm, Tx, A><<<embed::grid_for(p.N * p.C * p.S, 256), 256, 0, stream>>>(
      static_cast<const Tm*>(m), static_cast<const Tx*>(x), static_cast<const Tx*>(noise),
      static_cast<const A*>(coefs), static_cast<A*>(sample), static_cast<A*>(pred), p);
  return cudaGetLastError();
}

template <typename Tm>
cudaError_t by_x(DType x_dtype, const void* m, const void* x, const void* noise, const void* coefs,
                 void* sample, void* pred, const Params& p, cudaStream_t stream) {
  switch (x_dtype) {
    case DType::kFloat32: return launch<Tm, float, float>(m, x, noise, coefs, sample, pred, p, stream);
    case DType::kFloat16: return launch<Tm, __half, float>(m, x, noise, coefs, sample, pred, p, stream);
    case DType::kBFloat16:
      return launch<Tm, __nv_bfloat16, float>(m, x, noise, coefs, sample, pred, p, stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace

cudaError_t sampler_step(int mode, DType m_dtype, const void* model_out, int64_t m_batch,
                         int64_t m_channels, DType x_dtype, const void* x, const void* noise,
                         const void* coefs, void* sample, void* pred_xstart, int64_t N, int64_t C,
                         int64_t S, bool clip, bool guided, double cfg_scale,
                         int64_t guide_channels, cudaStream_t stream) {
  if (mode < sm::kDdpmLearnedRange || mode > sm::kDdim) return cudaErrorInvalidValue;
  if (N < 0 || C < 0 || S < 0) return cudaErrorInvalidValue;
  if (m_batch != (guided ? 2 * N : N)) return cudaErrorInvalidValue;
  if (m_channels < C || (mode == sm::kDdpmLearnedRange && m_channels < 2 * C))
    return cudaErrorInvalidValue;
  if (guided && (guide_channels < 0 || guide_channels > C)) return cudaErrorInvalidValue;
  if (N * C * S == 0) return cudaSuccess;
  const Params p{mode, N, C, S, m_channels, guide_channels, clip, guided, cfg_scale};
  if (m_dtype == DType::kFloat64 || x_dtype == DType::kFloat64) {
    if (m_dtype != DType::kFloat64 || x_dtype != DType::kFloat64) return cudaErrorNotSupported;
    return launch<double, double, double>(model_out, x, noise, coefs, sample, pred_xstart, p, stream);
  }
  switch (m_dtype) {
    case DType::kFloat32:
      return by_x<float>(x_dtype, model_out, x, noise, coefs, sample, pred_xstart, p, stream);
    case DType::kFloat16:
      return by_x<__half>(x_dtype, model_out, x, noise, coefs, sample, pred_xstart, p, stream);
    case DType::kBFloat16:
      return by_x<__nv_bfloat16>(x_dtype, model_out, x, noise, coefs, sample, pred_xstart, p,
                                 stream);
    default: return cudaErrorNotSupported;
  }
}

}  // namespace cuda
}  // namespace dit_fast
