// The CUDA device policy of the binding templates (binding_ops.h, binding_embed_ops.h), shared by
// the CUDA binding files (csrc/cuda/binding_cuda.cpp, csrc/cuda/binding_embed_cuda.cpp): launches
// on the tensor's device and torch's current stream there.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "binding_utils.h"

namespace dit_fast {
namespace binding {

struct Cuda {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr bool kAllowHalf = true;
  static c10::cuda::CUDAGuard guard(const at::Tensor& t) { return c10::cuda::CUDAGuard(t.device()); }
  static cudaStream_t exec(const at::Tensor& t) {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }
  // `why...`: what an invalid argument means for this call (appended to the message).
  template <class... Why>
  static void check(const char* op, cudaError_t err, const Why&... why) {
    check_status(op, kDevice, err == cudaSuccess, err == cudaErrorInvalidValue,
                 cudaGetErrorString(err), why...);
  }
};

}  // namespace binding
}  // namespace dit_fast
