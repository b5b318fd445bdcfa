// Tiny assertion helpers for the torch-free C++ unit tests (no gtest: no network needed).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

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
