// Torch binding of the CUDA kernels (extension dit_fast._C_cuda). Only compiled when torch is a
// CUDA build and nvcc is available. The op schemas are defined by dit_fast._C (csrc/binding.cpp),
// which must be imported first; this file only adds CUDA implementations.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "cuda/gated_residual_cuda.h"
#include "cuda/gelu_cuda.h"
#include "cuda/ln_modulate_cuda.h"

namespace dit_fast {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> ln_modulate_fwd_cuda(const Tensor& x, const Tensor& shift,
                                                        const Tensor& scale, double eps) {
  binding::check_ln_modulate_fwd(x, shift, scale, eps, /*allow_half=*/true);
  binding::check_device("dit_fast::ln_modulate_fwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor y = at::empty({N, T, D}, x.options());
  const auto st_opts = x.options().dtype(binding::stats_dtype(x.scalar_type()));
  Tensor mean = at::empty({N, T}, st_opts);
  Tensor rstd = at::empty({N, T}, st_opts);
  const cudaError_t err = cuda::ln_modulate_fwd(
      binding::to_dtype(x.scalar_type()), x.const_data_ptr(), shift.const_data_ptr(),
      binding::row_stride(shift, D), scale.const_data_ptr(), binding::row_stride(scale, D),
      y.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr(), N, T, D, eps,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "dit_fast::ln_modulate_fwd (cuda): ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_bwd_cuda(const Tensor& dy, const Tensor& x,
                                                        const Tensor& scale, const Tensor& mean,
                                                        const Tensor& rstd) {
  binding::check_ln_modulate_bwd(dy, x, scale, mean, rstd, /*allow_half=*/true);
  binding::check_device("dit_fast::ln_modulate_bwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor dx = at::empty({N, T, D}, x.options());
  Tensor dshift = at::empty({N, D}, x.options());
  Tensor dscale = at::empty({N, D}, x.options());
  const cudaError_t err = cuda::ln_modulate_bwd(
      binding::to_dtype(x.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(),
      scale.const_data_ptr(), binding::row_stride(scale, D), mean.const_data_ptr(),
      rstd.const_data_ptr(), dx.mutable_data_ptr(), dshift.mutable_data_ptr(),
      dscale.mutable_data_ptr(), N, T, D,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "dit_fast::ln_modulate_bwd (cuda): ", cudaGetErrorString(err));
  return {dx, dshift, dscale};
}

// ---- gated residual (+ LayerNorm-modulate) ----------------------------------------------------

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_fwd_cuda(
    const Tensor& x, const Tensor& y, const Tensor& gate, const Tensor& shift, const Tensor& scale,
    double eps) {
  binding::check_gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, eps, /*allow_half=*/true);
  binding::check_device("dit_fast::gated_residual_ln_modulate_fwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor x_new = at::empty({N, T, D}, x.options());
  Tensor h = at::empty({N, T, D}, x.options());
  const auto st_opts = x.options().dtype(binding::stats_dtype(x.scalar_type()));
  Tensor mean = at::empty({N, T}, st_opts);
  Tensor rstd = at::empty({N, T}, st_opts);
  const cudaError_t err = cuda::gated_residual_ln_modulate_fwd(
      binding::to_dtype(x.scalar_type()), x.const_data_ptr(), y.const_data_ptr(),
      gate.const_data_ptr(), binding::row_stride(gate, D), shift.const_data_ptr(),
      binding::row_stride(shift, D), scale.const_data_ptr(), binding::row_stride(scale, D),
      x_new.mutable_data_ptr(), h.mutable_data_ptr(), mean.mutable_data_ptr(),
      rstd.mutable_data_ptr(), N, T, D, eps, stream_of(x));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::gated_residual_ln_modulate_fwd (cuda): ",
              cudaGetErrorString(err));
  return {x_new, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_bwd_cuda(
    const std::optional<Tensor>& dx_new, const Tensor& dh, const Tensor& x_new, const Tensor& y,
    const Tensor& gate, const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  binding::check_gated_residual_ln_modulate_bwd(dx_new, dh, x_new, y, gate, scale, mean, rstd,
                                                /*allow_half=*/true);
  binding::check_device("dit_fast::gated_residual_ln_modulate_bwd", x_new, c10::DeviceType::CUDA,
                        "x_new");
  const c10::cuda::CUDAGuard guard(x_new.device());
  const int64_t N = x_new.size(0), T = x_new.size(1), D = x_new.size(2);
  const auto opts = x_new.options();
  Tensor dx = at::empty({N, T, D}, opts), dy = at::empty({N, T, D}, opts);
  Tensor dgate = at::empty({N, D}, opts), dshift = at::empty({N, D}, opts),
         dscale = at::empty({N, D}, opts);
  const cudaError_t err = cuda::gated_residual_ln_modulate_bwd(
      binding::to_dtype(x_new.scalar_type()),
      dx_new.has_value() ? dx_new->const_data_ptr() : nullptr, dh.const_data_ptr(),
      x_new.const_data_ptr(), y.const_data_ptr(), gate.const_data_ptr(),
      binding::row_stride(gate, D), scale.const_data_ptr(), binding::row_stride(scale, D),
      mean.const_data_ptr(), rstd.const_data_ptr(), dx.mutable_data_ptr(), dy.mutable_data_ptr(),
      dgate.mutable_data_ptr(), dshift.mutable_data_ptr(), dscale.mutable_data_ptr(), N, T, D,
      stream_of(x_new));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::gated_residual_ln_modulate_bwd (cuda): ",
              cudaGetErrorString(err));
  return {dx, dy, dgate, dshift, dscale};
}

Tensor gated_residual_fwd_cuda(const Tensor& x, const Tensor& y, const Tensor& gate) {
  binding::check_gated_residual_fwd(x, y, gate, /*allow_half=*/true);
  binding::check_device("dit_fast::gated_residual_fwd", x, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor out = at::empty({N, T, D}, x.options());
  const cudaError_t err = cuda::gated_residual_fwd(
      binding::to_dtype(x.scalar_type()), x.const_data_ptr(), y.const_data_ptr(),
      gate.const_data_ptr(), binding::row_stride(gate, D), out.mutable_data_ptr(), N, T, D,
      stream_of(x));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::gated_residual_fwd (cuda): ", cudaGetErrorString(err));
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_bwd_cuda(const Tensor& dout, const Tensor& y,
                                                   const Tensor& gate) {
  binding::check_gated_residual_bwd(dout, y, gate, /*allow_half=*/true);
  binding::check_device("dit_fast::gated_residual_bwd", dout, c10::DeviceType::CUDA, "dout");
  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t N = dout.size(0), T = dout.size(1), D = dout.size(2);
  Tensor dy = at::empty({N, T, D}, dout.options());
  Tensor dgate = at::empty({N, D}, dout.options());
  const cudaError_t err = cuda::gated_residual_bwd(
      binding::to_dtype(dout.scalar_type()), dout.const_data_ptr(), y.const_data_ptr(),
      gate.const_data_ptr(), binding::row_stride(gate, D), dy.mutable_data_ptr(),
      dgate.mutable_data_ptr(), N, T, D, stream_of(dout));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::gated_residual_bwd (cuda): ", cudaGetErrorString(err));
  return {dy, dgate};
}

// ---- bias + GELU ---------------------------------------------------------------------------

void gelu_bias_into_cuda(const char* op, const Tensor& h, const Tensor& bias, const Tensor& out) {
  binding::check_gelu_bias(op, h, bias, /*allow_half=*/true);
  binding::check_device(op, h, c10::DeviceType::CUDA, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t F = h.size(-1), M = F > 0 ? h.numel() / F : 0;
  const cudaError_t err =
      cuda::gelu_bias_fwd(binding::to_dtype(h.scalar_type()), h.const_data_ptr(),
                          bias.const_data_ptr(), out.mutable_data_ptr(), M, F, stream_of(h));
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): ", cudaGetErrorString(err));
}

Tensor gelu_bias_fwd_cuda(const Tensor& h, const Tensor& bias) {
  Tensor out = at::empty(h.sizes(), h.options());
  gelu_bias_into_cuda("dit_fast::gelu_bias_fwd", h, bias, out);
  return out;
}

void gelu_bias_fwd_inplace_cuda(const Tensor& h, const Tensor& bias) {
  gelu_bias_into_cuda("dit_fast::gelu_bias_fwd_", h, bias, h);
}

std::tuple<Tensor, Tensor> gelu_bias_bwd_cuda(const Tensor& dout, const Tensor& h,
                                              const Tensor& bias) {
  binding::check_gelu_bias_bwd(dout, h, bias, /*allow_half=*/true);
  binding::check_device("dit_fast::gelu_bias_bwd", h, c10::DeviceType::CUDA, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t F = h.size(-1), M = F > 0 ? h.numel() / F : 0;
  Tensor dh = at::empty(h.sizes(), h.options());
  Tensor dbias = at::empty({F}, h.options());
  const size_t ws_bytes = cuda::gelu_bias_bwd_workspace_bytes(M, F);
  // float64 elements: 8-byte aligned, as the launcher requires
  Tensor ws = at::empty({static_cast<int64_t>((ws_bytes + 7) / 8)},
                        h.options().dtype(c10::ScalarType::Double));
  const cudaError_t err = cuda::gelu_bias_bwd(
      binding::to_dtype(h.scalar_type()), dout.const_data_ptr(), h.const_data_ptr(),
      bias.const_data_ptr(), dh.mutable_data_ptr(), dbias.mutable_data_ptr(),
      ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr, M, F, stream_of(h));
  TORCH_CHECK(err == cudaSuccess, "dit_fast::gelu_bias_bwd (cuda): ", cudaGetErrorString(err));
  return {dh, dbias};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) {
  m.impl("ln_modulate_fwd", &dit_fast::ln_modulate_fwd_cuda);
  m.impl("ln_modulate_bwd", &dit_fast::ln_modulate_bwd_cuda);
  m.impl("gated_residual_ln_modulate_fwd", &dit_fast::gated_residual_ln_modulate_fwd_cuda);
  m.impl("gated_residual_ln_modulate_bwd", &dit_fast::gated_residual_ln_modulate_bwd_cuda);
  m.impl("gated_residual_fwd", &dit_fast::gated_residual_fwd_cuda);
  m.impl("gated_residual_bwd", &dit_fast::gated_residual_bwd_cuda);
  m.impl("gelu_bias_fwd", &dit_fast::gelu_bias_fwd_cuda);
  m.impl("gelu_bias_fwd_", &dit_fast::gelu_bias_fwd_inplace_cuda);
  m.impl("gelu_bias_bwd", &dit_fast::gelu_bias_bwd_cuda);
}

namespace {
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cuda",
                       "dit_fast CUDA kernels (adds CUDA impls to torch.ops.dit_fast.*).", -1,
                       nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kModule); }
