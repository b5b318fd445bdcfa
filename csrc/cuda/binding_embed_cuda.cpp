// Torch binding of the CUDA kernels of the embedding / sampler ops (extension dit_fast._C_cuda).
// The schemas are defined by dit_fast._C (csrc/binding_embed.cpp); this file only adds CUDA
// implementations: the bodies of binding_embed_ops.h with the Cuda policy (cuda/binding_cuda.h),
// which accepts float16 too.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "binding_embed_ops.h"
#include "binding_embed_utils.h"
#include "binding_utils.h"
#include "cuda/binding_cuda.h"
#include "cuda/embed_cuda.h"

namespace dit_fast {
namespace {

using at::Tensor;
using binding::Cuda;

// patch_embed_bwd: the CUDA launcher takes a workspace for dweight's split-M partial sums.
std::tuple<Tensor, Tensor, Tensor> patch_embed_bwd_cuda(const Tensor& dout, const Tensor& x,
                                                        const Tensor& weight, int64_t p,
                                                        bool need_dx, bool need_dweight,
                                                        bool need_dbias) {
  const char* op = "dit_fast::patch_embed_bwd";
  const binding::embed::PatchGeo g =
      binding::embed::check_patch_embed_bwd(dout, x, weight, p, Cuda::kAllowHalf);
  binding::check_device(op, x, Cuda::kDevice);
  const auto guard = Cuda::guard(x);
  Tensor dx = need_dx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor dw = need_dweight ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor db = need_dbias ? at::empty({g.D}, x.options()) : at::empty({0}, x.options());
  if (need_dx || need_dweight || need_dbias) {
    const DType dt = binding::to_dtype(x.scalar_type());
    const size_t ws_bytes =
        need_dweight ? cuda::patch_embed_bwd_workspace_bytes(dt, g.N, g.C, g.H, g.W, p, g.D) : 0;
    Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    Cuda::check(op, cuda::patch_embed_bwd(
                        dt, dout.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
                        need_dx ? dx.mutable_data_ptr() : nullptr,
                        need_dweight ? dw.mutable_data_ptr() : nullptr,
                        need_dbias ? db.mutable_data_ptr() : nullptr, g.N, g.C, g.H, g.W, p, g.D,
                        ws_bytes ? ws.mutable_data_ptr() : nullptr, Cuda::exec(x)));
  }
  return {dx, dw, db};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) {
  using dit_fast::binding::Cuda;
  namespace b = dit_fast::binding;
  namespace k = dit_fast::cuda;
  m.impl("patch_embed_fwd", &b::patch_embed_fwd<Cuda, &k::patch_embed_fwd>);
  m.impl("patch_embed_bwd", &dit_fast::patch_embed_bwd_cuda);
  m.impl("unpatchify_fwd", &b::unpatchify_fwd<Cuda, &k::unpatchify_fwd>);
  m.impl("unpatchify_bwd", &b::unpatchify_bwd<Cuda, &k::unpatchify_bwd>);
  m.impl("timestep_embedding_fwd", &b::timestep_embedding_fwd<Cuda, &k::timestep_embedding>);
  m.impl("sampler_step_fwd", &b::sampler_step_fwd<Cuda, &k::sampler_step>);
}
