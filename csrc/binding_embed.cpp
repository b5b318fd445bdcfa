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

#include "binding_cpu.h"
#include "binding_embed_ops.h"
#include "binding_embed_utils.h"
#include "binding_utils.h"
#include "cpu/patchify.h"
#include "cpu/sampler_step.h"
#include "cpu/timestep_embed.h"

namespace dit_fast {
namespace {

using at::Tensor;
using binding::Cpu;

std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cpu(const Tensor& dout, const Tensor& x,
                                                       const Tensor& weight, int64_t p,
                                                       bool need_dx, bool need_dweight,
                                                       bool need_dbias) {
  const char* op = "dit_fast::patch_embed_bwd";
  const binding::embed::PatchGeo g =
      binding::embed::check_patch_embed_bwd(dout, x, weight, p, Cpu::kAllowHalf);
  binding::check_device(op, x, Cpu::kDevice);
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = need_dweight ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor db = need_dbias ? at::empty({g.D}, x.options()) : at::empty({0}, x.options());
  if (need_dx || need_dweight || need_dbias) {
    Cpu::check(op, cpu::patch_embed_bwd(
                       binding::to_dtype(x.scalar_type()), dout.const_data_ptr(),
                       x.const_data_ptr(), weight.const_data_ptr(),
                       need_dx ? dx.mutable_data_ptr() : nullptr,
                       need_dweight ? dw.mutable_data_ptr() : nullptr,
                       need_dbias ? db.mutable_data_ptr() : nullptr, g.N, g.C, g.H, g.W, p, g.D,
                       Cpu::exec(x)));
  }
  return {dx, dw, db};
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
  using dit_fast::binding::Cpu;
  namespace b = dit_fast::binding;
  namespace k = dit_fast::cpu;
  m.impl("patch_embed_fwd", &b::patch_embed_fwd<Cpu, &k::patch_embed_fwd>);
  m.impl("patch_embed_bwd", &dit_fast::patch_embed_bwd_cpu);
  m.impl("unpatchify_fwd", &b::unpatchify_fwd<Cpu, &k::unpatchify_fwd>);
  m.impl("unpatchify_bwd", &b::unpatchify_bwd<Cpu, &k::unpatchify_bwd>);
  m.impl("timestep_embedding_fwd", &b::timestep_embedding_fwd<Cpu, &k::timestep_embedding>);
  m.impl("sampler_step_fwd", &b::sampler_step_fwd<Cpu, &k::sampler_step>);
}
