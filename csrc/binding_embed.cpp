// Torch binding of the CPU kernels of the embedding / sampler ops: the patch embedding
// (patchify GEMM + bias + pos_embed) and unpatchify, the sinusoidal timestep embedding and the
// fused sampler step. Adds schemas to the `dit_fast` library defined in csrc/binding.cpp (a
// library fragment) and registers their CPU implementations; CUDA implementations are in
// csrc/cuda/binding_embed_cuda.cpp. Fake kernels and autograd: dit_fast/ops/{patchify, adaln,
// sampler_step}.py.
//
// Ops:
//   patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? pos, int patch_size) -> Tensor
//       x (N, C, H, W), weight (D, C, p, p), bias (D,), pos (T, D) -> (N, T, D)
//   patch_embed_bwd(Tensor dout, Tensor x, Tensor weight, int patch_size, bool need_dx,
//                   bool need_dweight, bool need_dbias) -> (Tensor dx, Tensor dweight, Tensor dbias)
//       gradients not needed come back as empty (0-element) tensors
//   unpatchify_fwd(Tensor y, int patch_size, int out_channels, int grid_h, int grid_w) -> Tensor
//       y (N, T, p*p*C) -> (N, C, grid_h*p, grid_w*p)
//   unpatchify_bwd(Tensor dimg, int patch_size) -> Tensor          (N, C, H, W) -> (N, T, p*p*C)
//   timestep_embedding_fwd(Tensor t, Tensor freqs, int dim, ScalarType dtype) -> Tensor (N, dim)
//   sampler_step_fwd(Tensor model_out, Tensor x, Tensor? noise, Tensor coefs, int mode, bool clip,
//                    bool guided, float cfg_scale, int guide_channels) -> (Tensor sample,
//                    Tensor pred_xstart)

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "binding_embed_utils.h"
#include "binding_utils.h"
#include "cpu/patchify.h"
#include "cpu/sampler_step.h"
#include "cpu/timestep_embed.h"

#include <ATen/Parallel.h>

namespace dit_fast {
namespace {

using at::Tensor;
namespace be = binding::embed;

Tensor patch_embed_fwd_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& pos, int64_t p) {
  const be::PatchGeo g = be::check_patch_embed_fwd(x, weight, bias, pos, p, /*allow_half=*/false);
  binding::check_device("dit_fast::patch_embed_fwd", x, c10::DeviceType::CPU);
  Tensor out = at::empty({g.N, g.T, g.D}, x.options());
  const Status s = cpu::patch_embed_fwd(
      binding::to_dtype(x.scalar_type()), x.const_data_ptr(), weight.const_data_ptr(),
      be::opt_ptr(bias), be::opt_ptr(pos), out.mutable_data_ptr(), g.N, g.C, g.H, g.W, p, g.D,
      at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, "dit_fast::patch_embed_fwd (cpu): ", status_name(s));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cpu(const Tensor& dout, const Tensor& x,
                                                       const Tensor& weight, int64_t p,
                                                       bool need_dx, bool need_dweight,
                                                       bool need_dbias) {
  const be::PatchGeo g = be::check_patch_embed_bwd(dout, x, weight, p, /*allow_half=*/false);
  binding::check_device("dit_fast::patch_embed_bwd", x, c10::DeviceType::CPU);
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = need_dweight ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor db = need_dbias ? at::empty({g.D}, x.options()) : at::empty({0}, x.options());
  if (need_dx || need_dweight || need_dbias) {
    const Status s = cpu::patch_embed_bwd(
        binding::to_dtype(x.scalar_type()), dout.const_data_ptr(), x.const_data_ptr(),
        weight.const_data_ptr(), need_dx ? dx.mutable_data_ptr() : nullptr,
        need_dweight ? dw.mutable_data_ptr() : nullptr, need_dbias ? db.mutable_data_ptr() : nullptr,
        g.N, g.C, g.H, g.W, p, g.D, at::get_num_threads());
    TORCH_CHECK(s == Status::kOk, "dit_fast::patch_embed_bwd (cpu): ", status_name(s));
  }
  return {dx, dw, db};
}

Tensor unpatchify_fwd_cpu(const Tensor& y, int64_t p, int64_t out_channels, int64_t grid_h,
                          int64_t grid_w) {
  be::check_unpatchify_fwd(y, p, out_channels, grid_h, grid_w);
  binding::check_device("dit_fast::unpatchify_fwd", y, c10::DeviceType::CPU);
  const int64_t N = y.size(0);
  Tensor img = at::empty({N, out_channels, grid_h * p, grid_w * p}, y.options());
  const Status s = cpu::unpatchify_fwd(static_cast<int>(y.element_size()), y.const_data_ptr(),
                                       img.mutable_data_ptr(), N, out_channels, grid_h, grid_w, p,
                                       at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, "dit_fast::unpatchify_fwd (cpu): ", status_name(s));
  return img;
}

Tensor unpatchify_bwd_cpu(const Tensor& dimg, int64_t p) {
  be::check_unpatchify_bwd(dimg, p);
  binding::check_device("dit_fast::unpatchify_bwd", dimg, c10::DeviceType::CPU);
  const int64_t N = dimg.size(0), C = dimg.size(1), Hg = dimg.size(2) / p, Wg = dimg.size(3) / p;
  Tensor dy = at::empty({N, Hg * Wg, p * p * C}, dimg.options());
  const Status s = cpu::unpatchify_bwd(static_cast<int>(dimg.element_size()),
                                       dimg.const_data_ptr(), dy.mutable_data_ptr(), N, C, Hg, Wg,
                                       p, at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, "dit_fast::unpatchify_bwd (cpu): ", status_name(s));
  return dy;
}

Tensor timestep_embedding_fwd_cpu(const Tensor& t, const Tensor& freqs, int64_t dim,
                                  c10::ScalarType dtype) {
  be::check_timestep_embedding(t, freqs, dim, dtype, /*allow_half=*/false);
  binding::check_device("dit_fast::timestep_embedding_fwd", t, c10::DeviceType::CPU);
  const int64_t N = t.size(0);
  Tensor out = at::empty({N, dim}, t.options().dtype(dtype));
  const Status s = cpu::timestep_embedding(
      static_cast<cpu::IndexDType>(be::index_dtype(t.scalar_type())), t.const_data_ptr(),
      t.stride(0), freqs.const_data_ptr<float>(), binding::to_dtype(dtype), out.mutable_data_ptr(),
      N, dim, at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, "dit_fast::timestep_embedding_fwd (cpu): ", status_name(s));
  return out;
}

std::tuple<Tensor, Tensor> sampler_step_fwd_cpu(const Tensor& model_out, const Tensor& x,
                                                const c10::optional<Tensor>& noise,
                                                const Tensor& coefs, int64_t mode, bool clip,
                                                bool guided, double cfg_scale,
                                                int64_t guide_channels) {
  const be::SamplerGeo g = be::check_sampler_step(model_out, x, noise, coefs, mode, guided,
                                                  guide_channels, /*allow_half=*/false);
  binding::check_device("dit_fast::sampler_step_fwd", x, c10::DeviceType::CPU);
  const auto out_opts = x.options().dtype(coefs.scalar_type());
  Tensor sample = at::empty(x.sizes(), out_opts);
  Tensor pred = at::empty(x.sizes(), out_opts);
  const Status s = cpu::sampler_step(
      static_cast<int>(mode), binding::to_dtype(model_out.scalar_type()), model_out.const_data_ptr(),
      g.Bm, g.Cm, binding::to_dtype(x.scalar_type()), x.const_data_ptr(), be::opt_ptr(noise),
      coefs.const_data_ptr(), sample.mutable_data_ptr(), pred.mutable_data_ptr(), g.N, g.C, g.S,
      clip, guided, cfg_scale, guide_channels, at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, "dit_fast::sampler_step_fwd (cpu): ", status_name(s));
  return {sample, pred};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_FRAGMENT(dit_fast, m) {
  m.def("patch_embed_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? pos, int patch_size) -> Tensor");
  m.def(
      "patch_embed_bwd(Tensor dout, Tensor x, Tensor weight, int patch_size, bool need_dx, "
      "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor)");
  m.def(
      "unpatchify_fwd(Tensor y, int patch_size, int out_channels, int grid_h, int grid_w) -> "
      "Tensor");
  m.def("unpatchify_bwd(Tensor dimg, int patch_size) -> Tensor");
  m.def("timestep_embedding_fwd(Tensor t, Tensor freqs, int dim, ScalarType dtype) -> Tensor");
  m.def(
      "sampler_step_fwd(Tensor model_out, Tensor x, Tensor? noise, Tensor coefs, int mode, "
      "bool clip, bool guided, float cfg_scale, int guide_channels) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dit_fast, CPU, m) {
  m.impl("patch_embed_fwd", &dit_fast::patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &dit_fast::patch_embed_bwd_cpu);
  m.impl("unpatchify_fwd", &dit_fast::unpatchify_fwd_cpu);
  m.impl("unpatchify_bwd", &dit_fast::unpatchify_bwd_cpu);
  m.impl("timestep_embedding_fwd", &dit_fast::timestep_embedding_fwd_cpu);
  m.impl("sampler_step_fwd", &dit_fast::sampler_step_fwd_cpu);
}
