// Torch binding of the CUDA kernels (extension dit_fast._C_cuda). Only compiled when torch is a
// CUDA build and nvcc is available. The op schemas are defined by dit_fast._C (csrc/binding.cpp),
// which must be imported first; this file only adds CUDA implementations.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding_ops.h"
#include "cuda/binding_cuda.h"
#include "binding_utils.h"
#include "cuda/gated_residual_cuda.h"
#include "cuda/gelu_cuda.h"
#include "cuda/ln_modulate_cuda.h"

namespace dit_fast {
namespace {

using at::Tensor;

using binding::Cuda;

// ---- bias + GELU backward (a workspace for dbias; the forwards are binding_ops.h's) ------------

std::tuple<Tensor, Tensor> gelu_bias_bwd_cuda(const Tensor& dout, const Tensor& h,
                                              const Tensor& bias) {
  const char* op = "dit_fast::gelu_bias_bwd";
  binding::check_gelu_bias_bwd(dout, h, bias, Cuda::kAllowHalf);
  binding::check_device(op, h, Cuda::kDevice, "h");
  const auto guard = Cuda::guard(h);
  const int64_t F = h.size(-1), M = F > 0 ? h.numel() / F : 0;
  Tensor dh = at::empty(h.sizes(), h.options());
  Tensor dbias = at::empty({F}, h.options());
  const size_t ws_bytes = cuda::gelu_bias_bwd_workspace_bytes(M, F);
  // float64 elements: 8-byte aligned, as the launcher requires
  Tensor ws = at::empty({static_cast<int64_t>((ws_bytes + 7) / 8)},
                        h.options().dtype(c10::ScalarType::Double));
  Cuda::check(op, cuda::gelu_bias_bwd(binding::to_dtype(h.scalar_type()), dout.const_data_ptr(),
                                      h.const_data_ptr(), bias.const_data_ptr(),
                                      dh.mutable_data_ptr(), dbias.mutable_data_ptr(),
                                      ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, M, F,
                                      Cuda::exec(h)));
  return {dh, dbias};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) {
  using dit_fast::binding::Cuda;
  namespace b = dit_fast::binding;
  namespace k = dit_fast::cuda;
  m.impl("ln_modulate_fwd", &b::ln_modulate_fwd<Cuda, &k::ln_modulate_fwd>);
  m.impl("ln_modulate_bwd", &b::ln_modulate_bwd<Cuda, &k::ln_modulate_bwd>);
  m.impl("gated_residual_ln_modulate_fwd",
         &b::gated_residual_ln_modulate_fwd<Cuda, &k::gated_residual_ln_modulate_fwd>);
  m.impl("gated_residual_ln_modulate_bwd",
         &b::gated_residual_ln_modulate_bwd<Cuda, &k::gated_residual_ln_modulate_bwd>);
  m.impl("gated_residual_fwd", &b::gated_residual_fwd<Cuda, &k::gated_residual_fwd>);
  m.impl("gated_residual_bwd", &b::gated_residual_bwd<Cuda, &k::gated_residual_bwd>);
  m.impl("gelu_bias_fwd", &b::gelu_bias_fwd<Cuda, &k::gelu_bias_fwd>);
  m.impl("gelu_bias_fwd_", &b::gelu_bias_fwd_inplace<Cuda, &k::gelu_bias_fwd>);
  m.impl("gelu_bias_bwd", &dit_fast::gelu_bias_bwd_cuda);
}

namespace {
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cuda",
                       "dit_fast CUDA kernels (adds CUDA impls to torch.ops.dit_fast.*).", -1,
                       nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kModule); }
