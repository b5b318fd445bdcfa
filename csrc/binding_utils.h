// Torch-side helpers shared by every binding file (csrc/binding*.cpp, csrc/cuda/binding*.cpp):
// tensor checks that name the offending argument, dtype mapping, and the kernel-status check.
// The torch-free kernels validate their scalar arguments (sizes, strides, eps) themselves and
// return a status; the checks here cover what they cannot see (dtype, device, shape, layout).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/dtype.h"

namespace dit_fast {
namespace binding {

inline DType to_dtype(c10::ScalarType st) {
  switch (st) {
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::Double: return DType::kFloat64;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    case c10::ScalarType::Half: return DType::kFloat16;
    default: TORCH_CHECK(false, "dit_fast: unsupported dtype ", st);
  }
}

// float32 statistics for reduced-precision storage, float64 for float64.
inline c10::ScalarType stats_dtype(c10::ScalarType st) {
  return st == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// Fails with "<op> (<device>): <status>", plus ": <why...>" when the kernel reported an invalid
// argument (what that means for the call, e.g. "eps must be >= 0, got -1").
template <class... Why>
inline void check_status(const char* op, c10::DeviceType dev, bool ok, bool invalid_argument,
                         const char* status, const Why&... why) {
  if (ok) return;
  if constexpr (sizeof...(Why) > 0) {
    TORCH_CHECK(!invalid_argument, op, " (", c10::DeviceTypeName(dev, /*lower_case=*/true),
                "): ", status, ": ", why...);
  }
  TORCH_CHECK(false, op, " (", c10::DeviceTypeName(dev, /*lower_case=*/true), "): ", status);
}

// `name` (default "x") is the tensor whose dtype decides the kernel.
inline void check_dtype_supported(const char* op, const at::Tensor& x, bool allow_half,
                                  const char* name = "x") {
  const auto st = x.scalar_type();
  const bool ok = st == c10::ScalarType::Float || st == c10::ScalarType::Double ||
                  st == c10::ScalarType::BFloat16 || (allow_half && st == c10::ScalarType::Half);
  TORCH_CHECK(ok, op, ": ", name, " has unsupported dtype ", st,
              " (supported: float32, float64, bfloat16", allow_half ? ", float16)" : ")");
}

// Tensor `name` has the dtype and device of the reference tensor `ref_name` (default "x").
inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       const char* ref_name = "x") {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the same dtype as ",
              ref_name, " (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", x.device(), "), got ", t.device());
}

inline void check_device(const char* op, const at::Tensor& x, c10::DeviceType dev,
                         const char* name = "x") {
  TORCH_CHECK(x.device().type() == dev, op, ": ", name, " must be a ", c10::DeviceTypeName(dev),
              " tensor for this kernel, got ", x.device());
}

// (N, T, D) contiguous tensor `name` matching x's shape.
inline void check_ntd(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 3 && t.sizes() == x.sizes(), op, ": ", name, " must have shape ",
              x.sizes(), " (same as x), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// (N, D) tensor with unit stride along D. Any row stride works: a chunk of adaLN's (N, 6D) output
// (stride 6D) or an expanded (stride 0) tensor is read in place, without a copy.
inline void check_nd_rows(const char* op, const char* name, const at::Tensor& t, int64_t N,
                          int64_t D) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == D, op, ": ", name,
              " must have shape (N, D) = (", N, ", ", D, ") to match x, got ", t.sizes());
  TORCH_CHECK(D <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit stride along its last dimension, got strides ", t.strides());
}

inline int64_t row_stride(const at::Tensor& t, int64_t D) {
  return t.size(0) <= 1 ? D : t.stride(0);
}

// (N, T) contiguous statistics tensor.
inline void check_stats(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
              " must have shape (N, T) = (", x.size(0), ", ", x.size(1), "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == stats_dtype(x.scalar_type()), op, ": ", name, " must have dtype ",
              stats_dtype(x.scalar_type()), " for x of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as x (",
              x.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Tensor checks for ln_modulate_fwd(x, shift, scale, eps) (eps: the kernel's to check).
inline void check_ln_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                  const at::Tensor& scale, bool allow_half) {
  const char* op = "dit_fast::ln_modulate_fwd";
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D (N, T, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_dtype_supported(op, x, allow_half);
  check_same(op, "shift", shift, x);
  check_same(op, "scale", scale, x);
  check_nd_rows(op, "shift", shift, x.size(0), x.size(2));
  check_nd_rows(op, "scale", scale, x.size(0), x.size(2));
}

// Checks for ln_modulate_bwd(dy, x, scale, mean, rstd).
inline void check_ln_modulate_bwd(const at::Tensor& dy, const at::Tensor& x,
                                  const at::Tensor& scale, const at::Tensor& mean,
                                  const at::Tensor& rstd, bool allow_half) {
  const char* op = "dit_fast::ln_modulate_bwd";
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D (N, T, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_dtype_supported(op, x, allow_half);
  check_same(op, "dy", dy, x);
  check_ntd(op, "dy", dy, x);
  check_same(op, "scale", scale, x);
  check_nd_rows(op, "scale", scale, x.size(0), x.size(2));
  check_stats(op, "mean", mean, x);
  check_stats(op, "rstd", rstd, x);
}

// ---- gated residual (+ LayerNorm-modulate) ----------------------------------------------------

// x: 3-D contiguous with a supported dtype; `others` (N, T, D) tensors like x.
inline void check_ntd_input(const char* op, const at::Tensor& x, bool allow_half) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D (N, T, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_dtype_supported(op, x, allow_half);
}

inline void check_ntd_like(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& x) {
  check_same(op, name, t, x);
  check_ntd(op, name, t, x);
}

inline void check_nd_param(const char* op, const char* name, const at::Tensor& t,
                           const at::Tensor& x) {
  check_same(op, name, t, x);
  check_nd_rows(op, name, t, x.size(0), x.size(2));
}

// gated_residual_ln_modulate_fwd(x, y, gate, shift, scale, eps) (eps: the kernel's to check)
inline void check_gated_residual_ln_modulate_fwd(const at::Tensor& x, const at::Tensor& y,
                                                 const at::Tensor& gate, const at::Tensor& shift,
                                                 const at::Tensor& scale, bool allow_half) {
  const char* op = "dit_fast::gated_residual_ln_modulate_fwd";
  check_ntd_input(op, x, allow_half);
  check_ntd_like(op, "y", y, x);
  check_nd_param(op, "gate", gate, x);
  check_nd_param(op, "shift", shift, x);
  check_nd_param(op, "scale", scale, x);
}

// gated_residual_ln_modulate_bwd(dx_new?, dh, x_new, y, gate, scale, mean, rstd); x_new plays x.
inline void check_gated_residual_ln_modulate_bwd(const std::optional<at::Tensor>& dx_new,
                                                 const at::Tensor& dh, const at::Tensor& x_new,
                                                 const at::Tensor& y, const at::Tensor& gate,
                                                 const at::Tensor& scale, const at::Tensor& mean,
                                                 const at::Tensor& rstd, bool allow_half) {
  const char* op = "dit_fast::gated_residual_ln_modulate_bwd";
  TORCH_CHECK(x_new.dim() == 3, op, ": x_new must be a 3-D (N, T, D) tensor, got shape ",
              x_new.sizes());
  TORCH_CHECK(x_new.is_contiguous(), op, ": x_new must be contiguous");
  check_dtype_supported(op, x_new, allow_half, "x_new");
  if (dx_new.has_value()) check_ntd_like(op, "dx_new", *dx_new, x_new);
  check_ntd_like(op, "dh", dh, x_new);
  check_ntd_like(op, "y", y, x_new);
  check_nd_param(op, "gate", gate, x_new);
  check_nd_param(op, "scale", scale, x_new);
  check_stats(op, "mean", mean, x_new);
  check_stats(op, "rstd", rstd, x_new);
}

// gated_residual_fwd(x, y, gate)
inline void check_gated_residual_fwd(const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& gate, bool allow_half) {
  const char* op = "dit_fast::gated_residual_fwd";
  check_ntd_input(op, x, allow_half);
  check_ntd_like(op, "y", y, x);
  check_nd_param(op, "gate", gate, x);
}

// gated_residual_bwd(dout, y, gate); dout plays x.
inline void check_gated_residual_bwd(const at::Tensor& dout, const at::Tensor& y,
                                     const at::Tensor& gate, bool allow_half) {
  const char* op = "dit_fast::gated_residual_bwd";
  TORCH_CHECK(dout.dim() == 3, op, ": dout must be a 3-D (N, T, D) tensor, got shape ",
              dout.sizes());
  TORCH_CHECK(dout.is_contiguous(), op, ": dout must be contiguous");
  check_dtype_supported(op, dout, allow_half, "dout");
  check_same(op, "y", y, dout, "dout");
  check_ntd(op, "y", y, dout);
  check_same(op, "gate", gate, dout, "dout");
  check_nd_rows(op, "gate", gate, dout.size(0), dout.size(2));
}

// ---- bias + GELU ---------------------------------------------------------------------------

// h: (..., F) contiguous (at least 1-D); bias: (F,) contiguous, same dtype/device as h.
inline void check_gelu_bias(const char* op, const at::Tensor& h, const at::Tensor& bias,
                            bool allow_half) {
  TORCH_CHECK(h.dim() >= 1, op, ": h must have at least one dimension (..., F), got a scalar");
  TORCH_CHECK(h.is_contiguous(), op, ": h must be contiguous");
  check_dtype_supported(op, h, allow_half, "h");
  check_same(op, "bias", bias, h, "h");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(-1), op, ": bias must have shape (F,) = (",
              h.size(-1), ",) to match h of shape ", h.sizes(), ", got ", bias.sizes());
  TORCH_CHECK(bias.is_contiguous(), op, ": bias must be contiguous");
}

// gelu_bias_bwd(dout, h, bias)
inline void check_gelu_bias_bwd(const at::Tensor& dout, const at::Tensor& h,
                                const at::Tensor& bias, bool allow_half) {
  const char* op = "dit_fast::gelu_bias_bwd";
  check_gelu_bias(op, h, bias, allow_half);
  check_same(op, "dout", dout, h, "h");
  TORCH_CHECK(dout.sizes() == h.sizes(), op, ": dout must have shape ", h.sizes(),
              " (same as h), got ", dout.sizes());
  TORCH_CHECK(dout.is_contiguous(), op, ": dout must be contiguous");
}

}  // namespace binding
}  // namespace dit_fast
