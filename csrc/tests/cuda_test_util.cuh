// Helpers for the CUDA-vs-CPU kernel tests (csrc/tests/test_*_cuda.cu): device buffers, storage
// conversions, and a max-relative-error measure. Host code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/bf16.h"

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

inline bool have_gpu(const char* name) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("[%s] no CUDA device: skipped\n", name);
    return false;
  }
  return true;
}

}  // namespace cuda_test
