// Argument checks (naming the offending argument) shared by the CPU and CUDA bindings of the
// embedding / sampler ops (csrc/binding_embed.cpp, csrc/cuda/binding_embed_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include "binding_utils.h"
#include "common/sampler_step.h"

namespace dit_fast {
namespace binding {
namespace embed {

inline const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr() : nullptr;
}

inline bool is_float_dtype(c10::ScalarType st, bool allow_half) {
  return st == c10::ScalarType::Float || st == c10::ScalarType::Double ||
         st == c10::ScalarType::BFloat16 || (allow_half && st == c10::ScalarType::Half);
}

inline void check_float(const char* op, const char* name, const at::Tensor& t, bool allow_half) {
  TORCH_CHECK(is_float_dtype(t.scalar_type(), allow_half), op, ": ", name,
              " has unsupported dtype ", t.scalar_type(), " (supported: float32, float64, bfloat16",
              allow_half ? ", float16)" : ")");
}

// `t` has x's dtype and device, the given shape, and is contiguous.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                       at::IntArrayRef shape) {
  check_same(op, name, t, x);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

struct PatchGeo {
  int64_t N, C, H, W, D, T, K;
};

inline PatchGeo patch_geo(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t p,
                          bool allow_half) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_float(op, "x", x, allow_half);
  TORCH_CHECK(p > 0, op, ": patch_size must be positive, got ", p);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H % p == 0 && W % p == 0, op, ": the spatial size ", H, "x", W,
              " of x must be divisible by patch_size ", p);
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (D, C, p, p), got shape ",
              weight.sizes());
  const int64_t D = weight.size(0);
  check_like(op, "weight", weight, x, {D, C, p, p});
  return {N, C, H, W, D, (H / p) * (W / p), C * p * p};
}

inline PatchGeo check_patch_embed_fwd(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& pos, int64_t p,
                                      bool allow_half) {
  const char* op = "dit_fast::patch_embed_fwd";
  const PatchGeo g = patch_geo(op, x, weight, p, allow_half);
  if (bias.has_value() && bias->defined()) check_like(op, "bias", *bias, x, {g.D});
  if (pos.has_value() && pos->defined()) check_like(op, "pos", *pos, x, {g.T, g.D});
  return g;
}

inline PatchGeo check_patch_embed_bwd(const at::Tensor& dout, const at::Tensor& x,
                                      const at::Tensor& weight, int64_t p, bool allow_half) {
  const char* op = "dit_fast::patch_embed_bwd";
  const PatchGeo g = patch_geo(op, x, weight, p, allow_half);
  check_like(op, "dout", dout, x, {g.N, g.T, g.D});
  return g;
}

inline void check_unpatchify_fwd(const at::Tensor& y, int64_t p, int64_t out_channels,
                                 int64_t grid_h, int64_t grid_w) {
  const char* op = "dit_fast::unpatchify_fwd";
  TORCH_CHECK(y.dim() == 3, op, ": y must be a 3-D (N, T, p*p*C) tensor, got shape ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), op, ": y must be contiguous");
  TORCH_CHECK(p > 0 && out_channels >= 0 && grid_h >= 0 && grid_w >= 0, op,
              ": patch_size must be positive and out_channels, grid_h, grid_w non-negative");
  TORCH_CHECK(y.size(1) == grid_h * grid_w, op, ": y has ", y.size(1), " tokens, expected grid_h * "
              "grid_w = ", grid_h * grid_w);
  TORCH_CHECK(y.size(2) == p * p * out_channels, op, ": y's last dimension must be patch_size^2 * "
              "out_channels = ", p * p * out_channels, ", got ", y.size(2));
  const int64_t es = y.element_size();
  TORCH_CHECK(es == 2 || es == 4 || es == 8, op, ": unsupported dtype ", y.scalar_type());
}

inline void check_unpatchify_bwd(const at::Tensor& dimg, int64_t p) {
  const char* op = "dit_fast::unpatchify_bwd";
  TORCH_CHECK(dimg.dim() == 4, op, ": dimg must be a 4-D (N, C, H, W) tensor, got shape ",
              dimg.sizes());
  TORCH_CHECK(dimg.is_contiguous(), op, ": dimg must be contiguous");
  TORCH_CHECK(p > 0, op, ": patch_size must be positive, got ", p);
  TORCH_CHECK(dimg.size(2) % p == 0 && dimg.size(3) % p == 0, op, ": dimg's spatial size must be "
              "divisible by patch_size ", p);
  const int64_t es = dimg.element_size();
  TORCH_CHECK(es == 2 || es == 4 || es == 8, op, ": unsupported dtype ", dimg.scalar_type());
}

// Timestep dtypes: 0 float32, 1 float64, 2 int32, 3 int64 (cpu::IndexDType / the CUDA kernel's).
inline int index_dtype(c10::ScalarType st) {
  switch (st) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Double: return 1;
    case c10::ScalarType::Int: return 2;
    case c10::ScalarType::Long: return 3;
    default: return -1;
  }
}

inline void check_timestep_embedding(const at::Tensor& t, const at::Tensor& freqs, int64_t dim,
                                     c10::ScalarType dtype, bool allow_half) {
  const char* op = "dit_fast::timestep_embedding_fwd";
  TORCH_CHECK(t.dim() == 1, op, ": t must be 1-D (N,), got shape ", t.sizes());
  TORCH_CHECK(index_dtype(t.scalar_type()) >= 0, op, ": t has unsupported dtype ", t.scalar_type(),
              " (supported: float32, float64, int32, int64)");
  TORCH_CHECK(dim >= 0, op, ": dim must be non-negative, got ", dim);
  TORCH_CHECK(freqs.dim() == 1 && freqs.size(0) == dim / 2, op, ": freqs must have shape (",
              dim / 2, ",), got ", freqs.sizes());
  TORCH_CHECK(freqs.scalar_type() == c10::ScalarType::Float, op, ": freqs must be float32, got ",
              freqs.scalar_type());
  TORCH_CHECK(freqs.is_contiguous(), op, ": freqs must be contiguous");
  TORCH_CHECK(freqs.device() == t.device(), op, ": freqs must be on t's device (", t.device(),
              "), got ", freqs.device());
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
                  dtype == c10::ScalarType::BFloat16 ||
                  (allow_half && dtype == c10::ScalarType::Half),
              op, ": unsupported output dtype ", dtype);
}

struct SamplerGeo {
  int64_t N, C, S, Bm, Cm;
};

inline SamplerGeo check_sampler_step(const at::Tensor& model_out, const at::Tensor& x,
                                     const std::optional<at::Tensor>& noise,
                                     const at::Tensor& coefs, int64_t mode, bool guided,
                                     int64_t guide_channels, bool allow_half) {
  const char* op = "dit_fast::sampler_step_fwd";
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (DDPM, learned range), 1 (DDPM, fixed "
              "variance) or 2 (DDIM), got ", mode);
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (N, C, S), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  check_float(op, "x", x, allow_half);
  TORCH_CHECK(model_out.dim() == 3, op, ": model_out must be 3-D (B, Cm, S), got shape ",
              model_out.sizes());
  TORCH_CHECK(model_out.is_contiguous(), op, ": model_out must be contiguous");
  check_float(op, "model_out", model_out, allow_half);
  TORCH_CHECK(model_out.device() == x.device(), op, ": model_out must be on x's device (",
              x.device(), "), got ", model_out.device());
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  const int64_t Bm = model_out.size(0), Cm = model_out.size(1);
  TORCH_CHECK(Bm == (guided ? 2 * N : N), op, ": model_out must have batch ",
              guided ? 2 * N : N, guided ? " (2N: conditional half, then unconditional)" : "",
              ", got ", Bm);
  TORCH_CHECK(model_out.size(2) == S, op, ": model_out must have ", S, " elements per channel, got ",
              model_out.size(2));
  TORCH_CHECK(Cm >= (mode == sampler::kDdpmLearnedRange ? 2 * C : C), op,
              ": model_out has too few channels (", Cm, ") for x's ", C);
  if (guided)
    TORCH_CHECK(guide_channels >= 0 && guide_channels <= C, op, ": guide_channels must be in [0, ",
                C, "], got ", guide_channels);
  const bool f64 = x.scalar_type() == c10::ScalarType::Double;
  TORCH_CHECK(f64 == (model_out.scalar_type() == c10::ScalarType::Double), op,
              ": model_out and x must both be float64 or both not, got ", model_out.scalar_type(),
              " and ", x.scalar_type());
  if (noise.has_value() && noise->defined()) check_like(op, "noise", *noise, x, x.sizes());
  const auto want = f64 ? c10::ScalarType::Double : c10::ScalarType::Float;
  TORCH_CHECK(coefs.scalar_type() == want, op, ": coefs must be ", want, " for x of dtype ",
              x.scalar_type(), ", got ", coefs.scalar_type());
  TORCH_CHECK(coefs.dim() == 2 && coefs.size(0) == N && coefs.size(1) == sampler::kNumCoefs, op,
              ": coefs must have shape (", N, ", ", sampler::kNumCoefs, "), got ", coefs.sizes());
  TORCH_CHECK(coefs.is_contiguous() && coefs.device() == x.device(), op,
              ": coefs must be contiguous and on x's device");
  return {N, C, S, Bm, Cm};
}

}  // namespace embed
}  // namespace binding
}  // namespace dit_fast
