// Torch binding of the CUDA kernels (extension dit_fast._C_cuda). Only compiled when torch is a
// CUDA build and nvcc is available. The op schemas are defined by dit_fast._C (csrc/binding.cpp),
// which must be imported first; this file only adds CUDA implementations.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding_utils.h"
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

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_IMPL(dit_fast, CUDA, m) {
  m.impl("ln_modulate_fwd", &dit_fast::ln_modulate_fwd_cuda);
  m.impl("ln_modulate_bwd", &dit_fast::ln_modulate_bwd_cuda);
}

namespace {
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_cuda",
                       "dit_fast CUDA kernels (adds CUDA impls to torch.ops.dit_fast.*).", -1,
                       nullptr, nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&kModule); }
