// Torch-side helpers shared by csrc/binding.cpp (CPU) and csrc/cuda/binding_cuda.cpp (CUDA):
// argument checks that name the offending argument, and dtype mapping.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

inline void check_dtype_supported(const char* op, const at::Tensor& x, bool allow_half) {
  const auto st = x.scalar_type();
  const bool ok = st == c10::ScalarType::Float || st == c10::ScalarType::Double ||
                  st == c10::ScalarType::BFloat16 || (allow_half && st == c10::ScalarType::Half);
  TORCH_CHECK(ok, op, ": x has unsupported dtype ", st, " (supported: float32, float64, bfloat16",
              allow_half ? ", float16)" : ")");
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the same dtype as x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the same device as x (",
              x.device(), "), got ", t.device());
}

inline void check_device(const char* op, const at::Tensor& x, c10::DeviceType dev) {
  TORCH_CHECK(x.device().type() == dev, op, ": x must be a ", c10::DeviceTypeName(dev),
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

// All checks for ln_modulate_fwd(x, shift, scale, eps).
inline void check_ln_modulate_fwd(const at::Tensor& x, const at::Tensor& shift,
                                  const at::Tensor& scale, double eps, bool allow_half) {
  const char* op = "dit_fast::ln_modulate_fwd";
  TORCH_CHECK(x.dim() == 3, op, ": x must be a 3-D (N, T, D) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_dtype_supported(op, x, allow_half);
  check_same(op, "shift", shift, x);
  check_same(op, "scale", scale, x);
  check_nd_rows(op, "shift", shift, x.size(0), x.size(2));
  check_nd_rows(op, "scale", scale, x.size(0), x.size(2));
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

// All checks for ln_modulate_bwd(dy, x, scale, mean, rstd).
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

}  // namespace binding
}  // namespace dit_fast
