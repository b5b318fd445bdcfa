// Torch binding of the CPU kernels: defines the `dit_fast` operator library and registers the
// CPU implementations. CUDA implementations are registered by csrc/cuda/binding_cuda.cpp, built
// into the separate extension dit_fast._C_cuda (which requires this one to be loaded first).
//
// Ops (outputs have the input's dtype; mean/rstd are float32, or float64 for float64 inputs):
//   ln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (y, mean, rstd)
//   ln_modulate_bwd(Tensor dy, Tensor x, Tensor scale, Tensor mean, Tensor rstd)
//       -> (dx, dshift, dscale)
//   gated_residual_ln_modulate_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale,
//       float eps) -> (x_new, h, mean, rstd)
//   gated_residual_ln_modulate_bwd(Tensor? dx_new, Tensor dh, Tensor x_new, Tensor y, Tensor gate,
//       Tensor scale, Tensor mean, Tensor rstd) -> (dx, dy, dgate, dshift, dscale)
//   gated_residual_fwd(Tensor x, Tensor y, Tensor gate) -> out
//   gated_residual_bwd(Tensor dout, Tensor y, Tensor gate) -> (dy, dgate)     (dx = dout)
//   gelu_bias_fwd(Tensor h, Tensor bias) -> out;  gelu_bias_fwd_(Tensor(a!) h, Tensor bias) -> ()
//       (in place; returns nothing, so that it can be functionalized)
//   gelu_bias_bwd(Tensor dout, Tensor h, Tensor bias) -> (dh, dbias)
//   linear_fwd(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> out
//       out (..., N) = [gelu](x (..., K) @ weight^T + bias), x and weight (N, K) contiguous, all
//       float32 or all bfloat16 (float32 sums; cpu/gemm.h)
//   attention_fwd(Tensor qkv, int num_heads) -> (out, lse)
//       qkv (N, T, 3*D) (the qkv Linear's output; unit stride along the last dim, any N/T strides),
//       out (N, T, D) heads merged, lse (N, H, T) float32 (float64 for float64 qkv)
// (N, D) parameters (shift, scale, gate) may have any row stride but unit stride along D.
// Fake (meta) kernels and autograd are registered from Python (dit_fast/ops/*.py).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "binding_cpu.h"
#include "binding_ops.h"
#include "binding_utils.h"
#include "cpu/attention.h"
#include "cpu/gated_residual.h"
#include "cpu/gelu.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/ln_modulate.h"

namespace dit_fast {
namespace {

using at::Tensor;

using binding::Cpu;

// ---- bias + GELU backward (the element-wise forwards are binding_ops.h's) -----------------------

std::tuple<Tensor, Tensor> gelu_bias_bwd_cpu(const Tensor& dout, const Tensor& h,
                                             const Tensor& bias) {
  const char* op = "dit_fast::gelu_bias_bwd";
  binding::check_gelu_bias_bwd(dout, h, bias, Cpu::kAllowHalf);
  binding::check_device(op, h, Cpu::kDevice, "h");
  const int64_t F = h.size(-1), M = F > 0 ? h.numel() / F : 0;
  Tensor dh = at::empty(h.sizes(), h.options());
  Tensor dbias = at::empty({F}, h.options());
  Cpu::check(op, cpu::gelu_bias_bwd(binding::to_dtype(h.scalar_type()), dout.const_data_ptr(),
                                    h.const_data_ptr(), bias.const_data_ptr(),
                                    dh.mutable_data_ptr(), dbias.mutable_data_ptr(), M, F,
                                    Cpu::exec(h)));
  return {dh, dbias};
}

// ---- packed-weight linear --------------------------------------------------------------------

Tensor linear_fwd_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                      bool gelu) {
  const char* op = "dit_fast::linear_fwd";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (..., in_features)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::BFloat16, op,
              ": x must be float32 or bfloat16, got ", dtype);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, op, ": x's last dim (", x.size(-1), ") must equal weight's in_features (",
              K, ")");
  auto check = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have x's dtype ", dtype, ", got ",
                t.scalar_type());
    binding::check_device(op, t, Cpu::kDevice, name);
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  check(x, "x");
  check(weight, "weight");
  const void* b = nullptr;
  if (bias.has_value()) {
    check(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N,
                ",), got ", bias->sizes());
    b = bias->const_data_ptr();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor out = at::empty(shape, x.options());
  const int64_t M = K > 0 ? x.numel() / K : (N > 0 ? out.numel() / N : 0);
  const auto ep = gelu ? cpu::Epilogue::kGelu : cpu::Epilogue::kNone;
  const int nt = Cpu::exec(x);
  if (dtype == c10::ScalarType::Float) {
    Cpu::check(op, cpu::linear_fwd(x.const_data_ptr<float>(), K, weight.const_data_ptr<float>(),
                                   static_cast<const float*>(b), out.mutable_data_ptr<float>(), N,
                                   M, N, K, ep, nt));
  } else {
    Cpu::check(op, cpu::linear_fwd(static_cast<const bf16*>(x.const_data_ptr()), K,
                                   static_cast<const bf16*>(weight.const_data_ptr()),
                                   static_cast<const bf16*>(b),
                                   static_cast<bf16*>(out.mutable_data_ptr()), N, M, N, K, ep, nt));
  }
  return out;
}

// ---- attention -------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& qkv, int64_t num_heads) {
  const char* op = "dit_fast::attention_fwd";
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must be a 3-D (N, T, 3*D) tensor, got shape ",
              qkv.sizes());
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, got ", num_heads);
  TORCH_CHECK(qkv.size(2) % (3 * num_heads) == 0 && qkv.size(2) > 0, op,
              ": qkv's last dim must be a positive multiple of 3 * num_heads = ", 3 * num_heads,
              ", got ", qkv.size(2));
  binding::check_dtype_supported(op, qkv, /*allow_half=*/false);
  TORCH_CHECK(qkv.device().type() == c10::DeviceType::CPU, op,
              ": qkv must be a CPU tensor for this kernel, got ", qkv.device());
  TORCH_CHECK(qkv.size(2) <= 1 || qkv.stride(2) == 1, op,
              ": qkv must have unit stride along its last dimension, got strides ", qkv.strides());
  const int64_t N = qkv.size(0), T = qkv.size(1), D = qkv.size(2) / 3, H = num_heads;
  const int64_t Dh = D / H;
  Tensor out = at::empty({N, T, D}, qkv.options());
  Tensor lse = at::empty({N, H, T}, qkv.options().dtype(binding::stats_dtype(qkv.scalar_type())));
  Cpu::check(op, cpu::attention_fwd(binding::to_dtype(qkv.scalar_type()), qkv.const_data_ptr(),
                                    N > 1 ? qkv.stride(0) : 0, T > 1 ? qkv.stride(1) : 0,
                                    out.mutable_data_ptr(), lse.mutable_data_ptr(), N, T, H, Dh,
                                    1.0 / std::sqrt(static_cast<double>(Dh)), Cpu::exec(qkv)));
  return {out, lse};
}

}  // namespace
}  // namespace dit_fast

TORCH_LIBRARY(dit_fast, m) {
  m.def("ln_modulate_fwd(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ln_modulate_bwd(Tensor dy, Tensor x, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, "
      "Tensor, Tensor)");
  m.def(
      "gated_residual_ln_modulate_fwd(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gated_residual_ln_modulate_bwd(Tensor? dx_new, Tensor dh, Tensor x_new, Tensor y, "
      "Tensor gate, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor gate) -> Tensor");
  m.def("gated_residual_bwd(Tensor dout, Tensor y, Tensor gate) -> (Tensor, Tensor)");
  m.def("gelu_bias_fwd(Tensor h, Tensor bias) -> Tensor");
  m.def("gelu_bias_fwd_(Tensor(a!) h, Tensor bias) -> ()");
  m.def("gelu_bias_bwd(Tensor dout, Tensor h, Tensor bias) -> (Tensor, Tensor)");
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor");
  m.def("attention_fwd(Tensor qkv, int num_heads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dit_fast, CPU, m) {
  using dit_fast::binding::Cpu;
  namespace b = dit_fast::binding;
  namespace k = dit_fast::cpu;
  m.impl("ln_modulate_fwd", &b::ln_modulate_fwd<Cpu, &k::ln_modulate_fwd>);
  m.impl("ln_modulate_bwd", &b::ln_modulate_bwd<Cpu, &k::ln_modulate_bwd>);
  m.impl("gated_residual_ln_modulate_fwd",
         &b::gated_residual_ln_modulate_fwd<Cpu, &k::gated_residual_ln_modulate_fwd>);
  m.impl("gated_residual_ln_modulate_bwd",
         &b::gated_residual_ln_modulate_bwd<Cpu, &k::gated_residual_ln_modulate_bwd>);
  m.impl("gated_residual_fwd", &b::gated_residual_fwd<Cpu, &k::gated_residual_fwd>);
  m.impl("gated_residual_bwd", &b::gated_residual_bwd<Cpu, &k::gated_residual_bwd>);
  m.impl("gelu_bias_fwd", &b::gelu_bias_fwd<Cpu, &k::gelu_bias_fwd>);
  m.impl("gelu_bias_fwd_", &b::gelu_bias_fwd_inplace<Cpu, &k::gelu_bias_fwd>);
  m.impl("gelu_bias_bwd", &dit_fast::gelu_bias_bwd_cpu);
  m.impl("linear_fwd", &dit_fast::linear_fwd_cpu);
  m.impl("attention_fwd", &dit_fast::attention_fwd_cpu);
}

// ---- Python module `dit_fast._C`: importing it registers the ops above; a few CPU-runtime
// helpers are exposed for tests and benchmarks. (Plain CPython API: no pybind11 compile cost.)

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(dit_fast::cpu::isa_name(dit_fast::cpu::active_isa()));
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  dit_fast::cpu::Isa isa;
  if (!dit_fast::cpu::parse_isa(name, &isa)) {
    PyErr_Format(PyExc_ValueError, "unknown CPU ISA '%s' (expected auto, generic or avx2)", name);
    return nullptr;
  }
  const char* prev = dit_fast::cpu::isa_name(dit_fast::cpu::requested_isa());
  if (!dit_fast::cpu::set_isa(isa)) {
    PyErr_Format(PyExc_ValueError, "CPU ISA '%s' is not supported on this machine/build", name);
    return nullptr;
  }
  return PyUnicode_FromString(prev);
}

PyObject* py_supported_cpu_isas(PyObject*, PyObject*) {
  using dit_fast::cpu::Isa;
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2}) {
    if (!dit_fast::cpu::isa_supported(isa)) continue;
    PyObject* s = PyUnicode_FromString(dit_fast::cpu::isa_name(isa));
    if (s == nullptr || PyList_Append(out, s) != 0) {
      Py_XDECREF(s);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return out;
}

PyObject* py_has_openmp(PyObject*, PyObject*) {
  return PyBool_FromLong(dit_fast::cpu::has_openmp() ? 1 : 0);
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "ISA used by the CPU kernels now ('generic' or 'avx2')."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Force the CPU kernels' ISA ('auto', 'generic', 'avx2'); returns the previous request."},
    {"supported_cpu_isas", py_supported_cpu_isas, METH_NOARGS,
     "ISAs this build and CPU can run, e.g. ['generic', 'avx2']."},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the CPU kernels were built with OpenMP."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "dit_fast C++ CPU kernels (registers torch.ops.dit_fast.*).", -1, kMethods,
                       nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
