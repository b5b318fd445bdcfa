// Torch binding of the CUDA kernels of the embedding / sampler ops (extension dit_fast._C_cuda).
// The schemas are defined by dit_fast._C (csrc/binding_embed.cpp); this file only adds CUDA
// implementations. Same checks as the CPU binding (csrc/binding_embed_utils.h), plus float16.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding_embed_utils.h"
#include "binding_utils.h"
#include "cuda/embed_cuda.h"

namespace dit_fast {
namespace {

using at::Tensor;
namespace be = binding::embed;

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

Tensor patch_embed_fwd_cuda(const Tensor& x, const Tensor& weight,
                            const c10::optional<Tensor>& bias, const c10::optional<Tensor>& pos,
                            int64_t p) {
  const be::PatchGeo g = be::check_patch_embed_fwd(x, weight, bias, pos, p, /*allow_half=*/true);
  binding::check_device("dit_fast::patch_embed_fwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty({g.N, g.T, g.D}, x.options());
  const cudaError_t err = cuda::patch_embed_fwd(
      binding::to_dtype(x.scalar_type()), x.const_data_ptr(), weight.const_data_ptr(),
      be::opt_ptr(bias), be::opt_ptr(pos), out.mutable_data_ptr(), g.N, g.C, g.H, g.W, p, g.D,
      stream_of(x));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::patch_embed_fwd (cuda): ", cudaGetErrorString(err));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cuda(const Tensor& dout, const Tensor& x,
                                                        const Tensor& weight, int64_t p,
                                                        bool need_dx, bool need_dweight,
                                                        bool need_dbias) {
  const be::PatchGeo g = be::check_patch_embed_bwd(dout, x, weight, p, /*allow_half=*/true);
  binding::check_device("dit_fast::patch_embed_bwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = need_dweight ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor db = need_dbias ? at::empty({g.D}, x.options()) : at::empty({0}, x.options());
  if (need_dx || need_dweight || need_dbias) {
    const DType dt = binding::to_dtype(x.scalar_type());
    const size_t ws_bytes =
        need_dweight ? cuda::patch_embed_bwd_workspace_bytes(dt, g.N, g.C, g.H, g.W, p, g.D) : 0;
    Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    const cudaError_t err = cuda::patch_embed_bwd(
        dt, dout.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
        need_dx ? dx.mutable_data_ptr() : nullptr, need_dweight ? dw.mutable_data_ptr() : nullptr,
        need_dbias ? db.mutable_data_ptr() : nullptr, g.N, g.C, g.H, g.W, p, g.D,
        ws_bytes ? ws.mutable_data_ptr() : nullptr, stream_of(x));
    TORCH_CHECK(err == cudaSuccess, "dit_fast::patch_embed_bwd (cuda): ", cudaGetErrorString(err));
  }
  return {dx, dw, db};
}

Tensor unpatchify_fwd_cuda(const Tensor& y, int64_t p, int64_t out_channels, int64_t grid_h,
                           int64_t grid_w) {
  be::check_unpatchify_fwd(y, p, out_channels, grid_h, grid_w);
  binding::check_device("dit_fast::unpatchify_fwd", y, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t N = y.size(0);
  Tensor img = at::empty({N, out_channels, grid_h * p, grid_w * p}, y.options());
  const cudaError_t err =
      cuda::unpatchify_fwd(static_cast<int>(y.element_size()), y.const_data_ptr(),
                           img.mutable_data_ptr(), N, out_channels, grid_h, grid_w, p, stream_of(y));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::unpatchify_fwd (cuda): ", cudaGetErrorString(err));
  return img;
}

Tensor unpatchify_bwd_cuda(const Tensor& dimg, int64_t p) {
  be::check_unpatchify_bwd(dimg, p);
  binding::check_device("dit_fast::unpatchify_bwd", dimg, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(dimg.device());
  const int64_t N = dimg.size(0), C = dimg.size(1), Hg = dimg.size(2) / p, Wg = dimg.size(3) / p;
  Tensor dy = at::empty({N, Hg * Wg, p * p * C}, dimg.options());
  const cudaError_t err =
      cuda::unpatchify_bwd(static_cast<int>(dimg.element_size()), dimg.const_data_ptr(),
                           dy.mutable_data_ptr(), N, C, Hg, Wg, p, stream_of(dimg));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::unpatchify_bwd (cuda): ", cudaGetErrorString(err));
  return dy;
}

Tensor timestep_embedding_fwd_cuda(const Tensor& t, const Tensor& freqs, int64_t dim,
                                   c10::ScalarType dtype) {
  be::check_timestep_embedding(t, freqs, dim, dtype, /*allow_half=*/true);
  binding::check_device("dit_fast::timestep_embedding_fwd", t, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(t.device());
  const int64_t N = t.size(0);
  Tensor out = at::empty({N, dim}, t.options().dtype(dtype));
  const cudaError_t err = cuda::timestep_embedding(
      be::index_dtype(t.scalar_type()), t.const_data_ptr(), t.stride(0),
      freqs.const_data_ptr<float>(), binding::to_dtype(dtype), out.mutable_data_ptr(), N, dim,
      stream_of(t));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::timestep_embedding_fwd (cuda): ",
              cudaGetErrorString(err));
  return out;
}

std::tuple<Tensor, Tensor> sampler_step_fwd_cuda(const Tensor& model_out, const Tensor& x,
                                                 const c10::optional<Tensor>& noise,
                                                 const Tensor& coefs, int64_t mode, bool clip,
                                                 bool guided, double cfg_scale,
                                                 int64_t guide_channels) {
  const be::SamplerGeo g = be::check_sampler_step(model_out, x, noise, coefs, mode, guided,
                                                  guide_channels, /*allow_half=*/true);
  binding::check_device("dit_fast::sampler_step_fwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto out_opts = x.options().dtype(coefs.scalar_type());
  Tensor sample = at::empty(x.sizes(), out_opts);
  Tensor pred = at::empty(x.sizes(), out_opts);
  const cudaError_t err = cuda::sampler_step(
      static_cast<int>(mode), binding::to_dtype(model_out.scalar_type()),
      model_out.const_data_ptr(), g.Bm, g.Cm, binding::to_dtype(x.scalar_type()),
      x.const_data_ptr(), be::opt_ptr(noise), coefs.const_data_ptr(), sample.mutable_data_ptr(),
      pred.mutable_data_ptr(), g.N, g.C, g.S, clip, guided, cfg_scale, guide_channels,
      stream_of(x));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::sampler_step_fwd (cuda): ", cudaGetErrorString(err));
  return {sample, pred};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) {
  m.impl("patch_embed_fwd", &dit_fast::patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &dit_fast::patch_embed_bwd_cuda);
  m.impl("unpatchify_fwd", &dit_fast::unpatchify_fwd_cuda);
  m.impl("unpatchify_bwd", &dit_fast::unpatchify_bwd_cuda);
  m.impl("timestep_embedding_fwd", &dit_fast::timestep_embedding_fwd_cuda);
  m.impl("sampler_step_fwd", &dit_fast::sampler_step_fwd_cuda);
}
