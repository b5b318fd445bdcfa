// Storage dtypes understood by the torch-free kernels, and the status codes they return.
#pragma once

namespace dit_fast {

enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kBFloat16 = 2,
  kFloat16 = 3,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

enum class Status : int {
  kOk = 0,
  kUnsupportedDType = 1,
  kInvalidArgument = 2,
  kLaunchError = 3,
};

inline const char* status_name(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kUnsupportedDType: return "unsupported dtype";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kLaunchError: return "kernel launch error";
  }
  return "unknown status";
}

}  // namespace dit_fast
