// The torch-side bodies of the element-wise ops, written once for csrc/binding.cpp (CPU) and
// csrc/cuda/binding_cuda.cpp (CUDA): tensor checks, output allocation, the kernel call and its
// status check. Each body is a template over
//   Dev      the device policy (binding_cpu.h: Cpu, cuda/binding_cuda.h: Cuda): kDevice,
//            kAllowHalf (float16 accepted), guard(t) (an RAII device guard or a no-op), exec(t)
//            (the kernel's last argument: the CPU thread count, or the CUDA stream) and
//            check(op, result, why...) (Status / cudaError_t)
//   kKernel  the torch-free launcher (cpu::... or cuda::...; the same arguments before exec)
// so that `m.impl("ln_modulate_fwd", &binding::ln_modulate_fwd<Cpu, &cpu::ln_modulate_fwd>)`
// registers it. The embedding / sampler ops follow the same pattern (binding_embed_ops.h). Ops
// whose launchers differ (the CUDA gelu_bias_bwd takes a workspace) keep their own bodies in the
// binding files, built from the same policy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <tuple>

#include "binding_utils.h"

namespace dit_fast {
namespace binding {

using at::Tensor;

template <class Dev, auto kKernel>
std::tuple<Tensor, Tensor, Tensor> ln_modulate_fwd(const Tensor& x, const Tensor& shift,
                                                   const Tensor& scale, double eps) {
  const char* op = "dit_fast::ln_modulate_fwd";
  check_ln_modulate_fwd(x, shift, scale, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor y = at::empty({N, T, D}, x.options());
  const auto st_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor mean = at::empty({N, T}, st_opts);
  Tensor rstd = at::empty({N, T}, st_opts);
  Dev::check(op, kKernel(to_dtype(x.scalar_type()), x.const_data_ptr(), shift.const_data_ptr(),
                         row_stride(shift, D), scale.const_data_ptr(), row_stride(scale, D),
                         y.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr(),
                         N, T, D, eps, Dev::exec(x)),
             "eps must be >= 0, got ", eps);
  return {y, mean, rstd};
}

template <class Dev, auto kKernel>
std::tuple<Tensor, Tensor, Tensor> ln_modulate_bwd(const Tensor& dy, const Tensor& x,
                                                   const Tensor& scale, const Tensor& mean,
                                                   const Tensor& rstd) {
  const char* op = "dit_fast::ln_modulate_bwd";
  check_ln_modulate_bwd(dy, x, scale, mean, rstd, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor dx = at::empty({N, T, D}, x.options());
  Tensor dshift = at::empty({N, D}, x.options());
  Tensor dscale = at::empty({N, D}, x.options());
  Dev::check(op, kKernel(to_dtype(x.scalar_type()), dy.const_data_ptr(), x.const_data_ptr(),
                         scale.const_data_ptr(), row_stride(scale, D), mean.const_data_ptr(),
                         rstd.const_data_ptr(), dx.mutable_data_ptr(), dshift.mutable_data_ptr(),
                         dscale.mutable_data_ptr(), N, T, D, Dev::exec(x)));
  return {dx, dshift, dscale};
}

template <class Dev, auto kKernel>
std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_fwd(
    const Tensor& x, const Tensor& y, const Tensor& gate, const Tensor& shift, const Tensor& scale,
    double eps) {
  const char* op = "dit_fast::gated_residual_ln_modulate_fwd";
  check_gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor x_new = at::empty({N, T, D}, x.options());
  Tensor h = at::empty({N, T, D}, x.options());
  const auto st_opts = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor mean = at::empty({N, T}, st_opts);
  Tensor rstd = at::empty({N, T}, st_opts);
  Dev::check(op, kKernel(to_dtype(x.scalar_type()), x.const_data_ptr(), y.const_data_ptr(),
                         gate.const_data_ptr(), row_stride(gate, D), shift.const_data_ptr(),
                         row_stride(shift, D), scale.const_data_ptr(), row_stride(scale, D),
                         x_new.mutable_data_ptr(), h.mutable_data_ptr(), mean.mutable_data_ptr(),
                         rstd.mutable_data_ptr(), N, T, D, eps, Dev::exec(x)),
             "eps must be >= 0, got ", eps);
  return {x_new, h, mean, rstd};
}

template <class Dev, auto kKernel>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_bwd(
    const std::optional<Tensor>& dx_new, const Tensor& dh, const Tensor& x_new, const Tensor& y,
    const Tensor& gate, const Tensor& scale, const Tensor& mean, const Tensor& rstd) {
  const char* op = "dit_fast::gated_residual_ln_modulate_bwd";
  check_gated_residual_ln_modulate_bwd(dx_new, dh, x_new, y, gate, scale, mean, rstd,
                                       Dev::kAllowHalf);
  check_device(op, x_new, Dev::kDevice, "x_new");
  [[maybe_unused]] const auto guard = Dev::guard(x_new);
  const int64_t N = x_new.size(0), T = x_new.size(1), D = x_new.size(2);
  const auto opts = x_new.options();
  Tensor dx = at::empty({N, T, D}, opts), dy = at::empty({N, T, D}, opts);
  Tensor dgate = at::empty({N, D}, opts), dshift = at::empty({N, D}, opts),
         dscale = at::empty({N, D}, opts);
  Dev::check(op, kKernel(to_dtype(x_new.scalar_type()),
                         dx_new.has_value() ? dx_new->const_data_ptr() : nullptr,
                         dh.const_data_ptr(), x_new.const_data_ptr(), y.const_data_ptr(),
                         gate.const_data_ptr(), row_stride(gate, D), scale.const_data_ptr(),
                         row_stride(scale, D), mean.const_data_ptr(), rstd.const_data_ptr(),
                         dx.mutable_data_ptr(), dy.mutable_data_ptr(), dgate.mutable_data_ptr(),
                         dshift.mutable_data_ptr(), dscale.mutable_data_ptr(), N, T, D,
                         Dev::exec(x_new)));
  return {dx, dy, dgate, dshift, dscale};
}

template <class Dev, auto kKernel>
Tensor gated_residual_fwd(const Tensor& x, const Tensor& y, const Tensor& gate) {
  const char* op = "dit_fast::gated_residual_fwd";
  check_gated_residual_fwd(x, y, gate, Dev::kAllowHalf);
  check_device(op, x, Dev::kDevice);
  [[maybe_unused]] const auto guard = Dev::guard(x);
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  Tensor out = at::empty({N, T, D}, x.options());
  Dev::check(op, kKernel(to_dtype(x.scalar_type()), x.const_data_ptr(), y.const_data_ptr(),
                         gate.const_data_ptr(), row_stride(gate, D), out.mutable_data_ptr(), N, T,
                         D, Dev::exec(x)));
  return out;
}

template <class Dev, auto kKernel>
std::tuple<Tensor, Tensor> gated_residual_bwd(const Tensor& dout, const Tensor& y,
                                              const Tensor& gate) {
  const char* op = "dit_fast::gated_residual_bwd";
  check_gated_residual_bwd(dout, y, gate, Dev::kAllowHalf);
  check_device(op, dout, Dev::kDevice, "dout");
  [[maybe_unused]] const auto guard = Dev::guard(dout);
  const int64_t N = dout.size(0), T = dout.size(1), D = dout.size(2);
  Tensor dy = at::empty({N, T, D}, dout.options());
  Tensor dgate = at::empty({N, D}, dout.options());
  Dev::check(op, kKernel(to_dtype(dout.scalar_type()), dout.const_data_ptr(), y.const_data_ptr(),
                         gate.const_data_ptr(), row_stride(gate, D), dy.mutable_data_ptr(),
                         dgate.mutable_data_ptr(), N, T, D, Dev::exec(dout)));
  return {dy, dgate};
}

// bias + GELU into `out` (a new tensor, or h itself for the in-place op).
template <class Dev, auto kKernel>
void gelu_bias_into(const char* op, const Tensor& h, const Tensor& bias, const Tensor& out) {
  check_gelu_bias(op, h, bias, Dev::kAllowHalf);
  check_device(op, h, Dev::kDevice, "h");
  [[maybe_unused]] const auto guard = Dev::guard(h);
  const int64_t F = h.size(-1), M = F > 0 ? h.numel() / F : 0;
  Dev::check(op, kKernel(to_dtype(h.scalar_type()), h.const_data_ptr(), bias.const_data_ptr(),
                         out.mutable_data_ptr(), M, F, Dev::exec(h)));
}

template <class Dev, auto kKernel>
Tensor gelu_bias_fwd(const Tensor& h, const Tensor& bias) {
  Tensor out = at::empty(h.sizes(), h.options());
  gelu_bias_into<Dev, kKernel>("dit_fast::gelu_bias_fwd", h, bias, out);
  return out;
}

template <class Dev, auto kKernel>
void gelu_bias_fwd_inplace(const Tensor& h, const Tensor& bias) {
  gelu_bias_into<Dev, kKernel>("dit_fast::gelu_bias_fwd_", h, bias, h);
}

}  // namespace binding
}  // namespace dit_fast
