// The CPU device policy of the binding templates (binding_ops.h, binding_embed_ops.h), shared by
// the CPU binding files (csrc/binding.cpp, csrc/binding_embed.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "binding_utils.h"
#include "common/dtype.h"

namespace dit_fast {
namespace binding {

struct Cpu {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr bool kAllowHalf = false;
  struct NoGuard {};
  static NoGuard guard(const at::Tensor&) { return {}; }
  static int exec(const at::Tensor&) { return at::get_num_threads(); }
  // `why...`: what an invalid argument means for this call (appended to the message).
  template <class... Why>
  static void check(const char* op, Status s, const Why&... why) {
    check_status(op, kDevice, s == Status::kOk, s == Status::kInvalidArgument, status_name(s), why...);
  }
};

}  // namespace binding
}  // namespace dit_fast
