// The torch-side bodies of the embedding / sampler ops, written once for csrc/binding_embed.cpp
// (CPU) and csrc/cuda/binding_embed_cuda.cpp (CUDA): templates over the device policy Dev and the
// torch-free launcher kKernel, exactly as binding_ops.h (which explains the pattern). Checks:
// binding_embed_utils.h. patch_embed_bwd, whose CUDA launcher takes a workspace, keeps one body
// per binding file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "binding_embed_utils.h"
#include "binding_utils.h"

namespace dit_fast {
namespace binding {

// The type of a launcher's first parameter (the timestep dtype code: an enum on the CPU, an int
// on CUDA).
template <class R, class A0, class... As>
A0 first_param(R (*)(A0, As...));
template <auto kKernel>
using FirstParam = decltype(first_param(kKernel));

template <class Dev, auto kKernel>
at::Tensor patch_embed_fwd(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& pos, int64_t p) {
  const char* op = "dit_fast::patch_embed_fwd";
  const embed::PatchGeo g = embed::check_patch_embed_fwd(x, weight, bias, pos, p, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  at::Tensor out = at::empty({g.N, g.T, g.D}, x.options());
  Dev::check(op, kKernel(to_dtype(x.scalar_type()), x.const_data_ptr(), weight.const_data_ptr(),
                         embed::opt_ptr(bias), embed::opt_ptr(pos), out.mutable_data_ptr(), g.N,
                         g.C, g.H, g.W, p, g.D, Dev::exec(x)));
  return out;
}

template <class Dev, auto kKernel>
at::Tensor unpatchify_fwd(const at::Tensor& y, int64_t p, int64_t out_channels, int64_t grid_h,
                          int64_t grid_w) {
  const char* op = "dit_fast::unpatchify_fwd";
  embed::check_unpatchify_fwd(y, p, out_channels, grid_h, grid_w);
  check_device(op, y, Dev::kDevice, "y");
  [[maybe_unused]] const auto guard = Dev::guard(y);
  const int64_t N = y.size(0);
  at::Tensor img = at::empty({N, out_channels, grid_h * p, grid_w * p}, y.options());
  Dev::check(op, kKernel(static_cast<int>(y.element_size()), y.const_data_ptr(),
                         img.mutable_data_ptr(), N, out_channels, grid_h, grid_w, p,
                         Dev::exec(y)));
  return img;
}

template <class Dev, auto kKernel>
at::Tensor unpatchify_bwd(const at::Tensor& dimg, int64_t p) {
  const char* op = "dit_fast::unpatchify_bwd";
  embed::check_unpatchify_bwd(dimg, p);
  check_device(op, dimg, Dev::kDevice, "dimg");
  [[maybe_unused]] const auto guard = Dev::guard(dimg);
  const int64_t N = dimg.size(0), C = dimg.size(1), Hg = dimg.size(2) / p, Wg = dimg.size(3) / p;
  at::Tensor dy = at::empty({N, Hg * Wg, p * p * C}, dimg.options());
  Dev::check(op, kKernel(static_cast<int>(dimg.element_size()), dimg.const_data_ptr(),
                         dy.mutable_data_ptr(), N, C, Hg, Wg, p, Dev::exec(dimg)));
  return dy;
}

template <class Dev, auto kKernel>
at::Tensor timestep_embedding_fwd(const at::Tensor& t, const at::Tensor& freqs, int64_t dim,
                                  c10::ScalarType dtype) {
  const char* op = "dit_fast::timestep_embedding_fwd";
  embed::check_timestep_embedding(t, freqs, dim, dtype, Dev::kAllowHalf);
  check_device(op, t, Dev::kDevice, "t");
  [[maybe_unused]] const auto guard = Dev::guard(t);
  const int64_t N = t.size(0);
  at::Tensor out = at::empty({N, dim}, t.options().dtype(dtype));
  Dev::check(op, kKernel(static_cast<FirstParam<kKernel>>(embed::index_dtype(t.scalar_type())),
                         t.const_data_ptr(), t.stride(0), freqs.const_data_ptr<float>(),
                         to_dtype(dtype), out.mutable_data_ptr(), N, dim, Dev::exec(t)));
  return out;
}

template <class Dev, auto kKernel>
std::tuple<at::Tensor, at::Tensor> sampler_step_fwd(const at::Tensor& model_out,
                                                    const at::Tensor& x,
                                                    const std::optional<at::Tensor>& noise,
                                                    const at::Tensor& coefs, int64_t mode,
                                                    bool clip, bool guided, double cfg_scale,
                                                    int64_t guide_channels) {
  const char* op = "dit_fast::sampler_step_fwd";
  const embed::SamplerGeo g = embed::check_sampler_step(model_out, x, noise, coefs, mode, guided,
                                                        guide_channels, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  const auto out_opts = x.options().dtype(coefs.scalar_type());
  at::Tensor sample = at::empty(x.sizes(), out_opts);
  at::Tensor pred = at::empty(x.sizes(), out_opts);
  Dev::check(op, kKernel(static_cast<int>(mode), to_dtype(model_out.scalar_type()),
                         model_out.const_data_ptr(), g.Bm, g.Cm, to_dtype(x.scalar_type()),
                         x.const_data_ptr(), embed::opt_ptr(noise), coefs.const_data_ptr(),
                         sample.mutable_data_ptr(), pred.mutable_data_ptr(), g.N, g.C, g.S, clip,
                         guided, cfg_scale, guide_channels, Dev::exec(x)));
  return {sample, pred};
}

}  // namespace binding
}  // namespace dit_fast
