// What the torch-free C++ unit tests share (no gtest: no network needed): CHECK and the exit code,
// the storage types of the kernels with their exact conversions, error measures, and running a
// test on each CPU ISA path. Also the standard headers every test uses (below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/dtype.h"
#include "cpu/isa.h"

namespace dit_test {
inline int& failures() {
  static int f = 0;
  return f;
}
inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("[%s] all checks passed\n", name);
    return 0;
  }
  std::printf("[%s] %d check(s) FAILED\n", name, failures());
  return 1;
}
}  // namespace dit_test

// CHECK(cond, fmt, ...): records a failure (and prints the first 20) but keeps going.
#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      if (++dit_test::failures() <= 20) {                                      \
        std::printf("%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond);  \
        std::printf(__VA_ARGS__);                                              \
        std::printf("\n");                                                     \
      }                                                                        \
    }                                                                          \
  } while (0)

namespace dit_test {

// A kernel's storage type T: its DType, the type A of its statistics (mean, rstd, lse), and
// conversions from double (rounding to T) and to double (exact).
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  using A = float;
  static constexpr dit_fast::DType dtype = dit_fast::DType::kFloat32;
  static float from(double v) { return static_cast<float>(v); }
  static double to(float v) { return v; }
};
template <>
struct Storage<double> {
  using A = double;
  static constexpr dit_fast::DType dtype = dit_fast::DType::kFloat64;
  static double from(double v) { return v; }
  static double to(double v) { return v; }
};
template <>
struct Storage<dit_fast::bf16> {
  using A = float;
  static constexpr dit_fast::DType dtype = dit_fast::DType::kBFloat16;
  static dit_fast::bf16 from(double v) { return dit_fast::to_bf16(static_cast<float>(v)); }
  static double to(dit_fast::bf16 v) { return dit_fast::to_float(v); }
};

// The value for storage type T out of its float, double and bf16 values (e.g. a tolerance).
template <typename T>
constexpr double per_storage(double f32, double f64, double bf16) {
  if constexpr (std::is_same_v<T, float>) {
    return f32;
  } else if constexpr (std::is_same_v<T, double>) {
    return f64;
  } else {
    static_assert(std::is_same_v<T, dit_fast::bf16>, "per_storage: float, double or bf16");
    return bf16;
  }
}

// Calls body(T{}) for each CPU storage type T: float, double, bf16.
template <typename F>
void for_each_storage(F&& body) {
  body(float{});
  body(double{});
  body(dit_fast::bf16{});
}

// Mean and 1 / sqrt(variance + eps) of one row of D values (the reference LayerNorm's statistics).
inline std::pair<double, double> row_stats(const double* r, int64_t D, double eps) {
  double m = 0, v = 0;
  for (int64_t i = 0; i < D; ++i) m += r[i];
  m /= D;
  for (int64_t i = 0; i < D; ++i) v += (r[i] - m) * (r[i] - m);
  v /= D;
  return {m, 1.0 / std::sqrt(v + eps)};
}

template <typename V>
std::vector<double> as_double(const std::vector<V>& v) {
  std::vector<double> o;
  o.reserve(v.size());
  for (const V& x : v) o.push_back(Storage<V>::to(x));
  return o;
}

// max |got - want| / max(max |want|, floor) over one tensor (0 for an empty one).
inline double rel_err(const std::vector<double>& got, const std::vector<double>& want,
                      double floor = 1e-30) {
  double err = 0, mag = floor;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  return want.empty() ? 0 : err / mag;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Calls body(isa) with each CPU ISA path of this binary and CPU active in turn (generic first),
// then restores the automatic choice.
template <typename F>
void for_each_isa(F&& body) {
  for (dit_fast::cpu::Isa isa : {dit_fast::cpu::Isa::kGeneric, dit_fast::cpu::Isa::kAvx2}) {
    if (!dit_fast::cpu::isa_supported(isa)) continue;
    CHECK(dit_fast::cpu::set_isa(isa), "set_isa(%s)", dit_fast::cpu::isa_name(isa));
    body(isa);
  }
  dit_fast::cpu::set_isa(dit_fast::cpu::Isa::kAuto);
}

}  // namespace dit_test
