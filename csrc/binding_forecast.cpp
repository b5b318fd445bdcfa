// Torch binding of the CPU Taylor forecast kernel (cpu/forecast.h): adds its schema to the
// `dit_fast` library defined in csrc/binding.cpp (a library fragment). Fake kernel and the
// public op: dit_fast/ops/forecast.py.
//
//   taylor_forecast_(Tensor(a!) out, Tensor factors, float[] weights) -> ()
//       out (...) float32 / bfloat16 / float64, contiguous, written in place;
//       factors (K, *out.shape) contiguous, float32 (float64 for float64 out); weights: K floats.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "cpu/forecast.h"

namespace dit_fast {
namespace {

using at::Tensor;

void taylor_forecast_cpu(Tensor& out, const Tensor& factors, c10::ArrayRef<double> weights) {
  const char* op = "dit_fast::taylor_forecast_";
  binding::check_dtype_supported(op, out, /*allow_half=*/false, "out");
  binding::check_device(op, out, c10::DeviceType::CPU, "out");
  binding::check_device(op, factors, c10::DeviceType::CPU, "factors");
  const auto want = binding::stats_dtype(out.scalar_type());  // float32, float64 for float64 out
  TORCH_CHECK(factors.scalar_type() == want, op, ": factors must be ", want, " for a ",
              out.scalar_type(), " out, got ", factors.scalar_type());
  const int64_t K = static_cast<int64_t>(weights.size());
  TORCH_CHECK(K >= 1 && K <= cpu::kForecastMaxFactors, op, ": weights must hold 1 to ",
              cpu::kForecastMaxFactors, " values, got ", K);
  TORCH_CHECK(factors.dim() == out.dim() + 1 && factors.size(0) == K &&
                  factors.sizes().slice(1) == out.sizes(),
              op, ": factors must have shape (", K, ", *out.shape) with out.shape ", out.sizes(),
              ", got ", factors.sizes());
  TORCH_CHECK(out.is_contiguous() && factors.is_contiguous(), op,
              ": out and factors must be contiguous");
  const Status s = cpu::taylor_forecast(binding::to_dtype(out.scalar_type()), out.mutable_data_ptr(),
                                        binding::to_dtype(factors.scalar_type()),
                                        factors.const_data_ptr(), weights.data(), K, out.numel(),
                                        at::get_num_threads());
  TORCH_CHECK(s == Status::kOk, op, " (cpu): ", status_name(s));
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY_FRAGMENT(dit_fast, m) {
  m.def("taylor_forecast_(Tensor(a!) out, Tensor factors, float[] weights) -> ()");
}

TORCH_LIBRARY_IMPL(dit_fast, CPU, m) { m.impl("taylor_forecast_", &dit_fast::taylor_forecast_cpu); }
