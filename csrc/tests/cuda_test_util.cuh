// Helpers for the CUDA-vs-CPU kernel tests (csrc/tests/test_*_cuda.cu): device buffers, each
// storage type with the CPU kernel that serves as its reference, a max-relative-error measure and
// its check. Host code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/dtype.h"
#include "tests/check.h"

#define CUDA_OK(expr)                                                                       \
  do {                                                                                      \
    cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                \
      std::printf("%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

namespace cuda_test {

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CUDA_OK(cudaMalloc(&p, sizeof(T) * (n ? n : 1))); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void put(const std::vector<T>& h) {
    if (n) CUDA_OK(cudaMemcpy(p, h.data(), sizeof(T) * n, cudaMemcpyHostToDevice));
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) CUDA_OK(cudaMemcpy(h.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
    return h;
  }
};

inline double to_d(float v) { return v; }
inline double to_d(double v) { return v; }
inline double to_d(dit_fast::bf16 v) { return dit_fast::to_float(v); }
inline double to_d(__half v) { return __half2float(v); }

// max |got - want| / max |want| over one tensor (0 for empty tensors).
template <typename S, typename R>
double max_rel(const std::vector<S>& got, const std::vector<R>& want) {
  double err = 0, mag = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::fmax(err, std::fabs(to_d(got[i]) - to_d(want[i])));
    mag = std::fmax(mag, std::fabs(to_d(want[i])));
  }
  return want.empty() ? 0 : err / mag;
}

// Host storage S of a CUDA kernel's tensors, and its reference: the CPU kernel run on storage C
// (S itself, or float for fp16, which has no CPU kernel) with statistics of type A.
template <typename S, typename C_, typename A_, dit_fast::DType DT, dit_fast::DType CPU_DT>
struct HostOf {
  using C = C_;
  using A = A_;
  static constexpr dit_fast::DType dt = DT, cpu_dt = CPU_DT;
};
template <typename S>
struct Host;
template <>
struct Host<float> : HostOf<float, float, float, dit_fast::DType::kFloat32, dit_fast::DType::kFloat32> {
  static float from(float v) { return v; }
};
template <>
struct Host<double> : HostOf<double, double, double, dit_fast::DType::kFloat64, dit_fast::DType::kFloat64> {
  static double from(float v) { return v; }
};
template <>
struct Host<dit_fast::bf16>
    : HostOf<dit_fast::bf16, dit_fast::bf16, float, dit_fast::DType::kBFloat16, dit_fast::DType::kBFloat16> {
  static dit_fast::bf16 from(float v) { return dit_fast::to_bf16(v); }
};
template <>
struct Host<__half> : HostOf<__half, float, float, dit_fast::DType::kFloat16, dit_fast::DType::kFloat32> {
  static __half from(float v) { return __float2half_rn(v); }
};

// Calls body(S{}) for each host storage type S: float, double, bf16, fp16.
template <typename F>
void for_each_host(F&& body) {
  body(float{});
  body(double{});
  body(dit_fast::bf16{});
  body(__half{});
}

// The value for host type S out of its fp32, fp64, bf16 and fp16 values (e.g. a tolerance).
template <typename S>
constexpr double per_host(double f32, double f64, double bf16, double f16) {
  if constexpr (std::is_same_v<S, float>) {
    return f32;
  } else if constexpr (std::is_same_v<S, double>) {
    return f64;
  } else if constexpr (std::is_same_v<S, dit_fast::bf16>) {
    return bf16;
  } else {
    static_assert(std::is_same_v<S, __half>, "per_host: float, double, bf16 or __half");
    return f16;
  }
}

// The CPU kernel's copy of host tensor v (fp16 widened to float, other types as they are).
template <typename S>
std::vector<typename Host<S>::C> cpu_copy(const std::vector<S>& v) {
  std::vector<typename Host<S>::C> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same_v<S, __half>) o[i] = __half2float(v[i]);
    else o[i] = v[i];
  }
  return o;
}

// printf-style std::string (names a test case in CHECK messages).
inline std::string format(const char* fmt, ...) {
  char buf[256];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

// CHECKs each (name, max_rel error) of one case against tol.
inline void expect_within(const std::string& where, double tol,
                          std::initializer_list<std::pair<const char*, double>> errors) {
  for (const auto& [what, e] : errors)
    CHECK(e <= tol, "%s: %s rel err %.3g > %.3g", where.c_str(), what, e, tol);
}

inline bool have_gpu(const char* name) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("[%s] no CUDA device: skipped\n", name);
    return false;
  }
  return true;
}

}  // namespace cuda_test
