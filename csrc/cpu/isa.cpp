#include "cpu/isa.h"

#include <atomic>
#include <cstring>
#include <initializer_list>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dit_fast {
namespace cpu {

namespace {
std::atomic<int> g_requested{static_cast<int>(Isa::kAuto)};

bool cpu_has_avx2() {
#if DIT_CPU_HAVE_AVX2_PATH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}
}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAuto: return "auto";
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  if (name == nullptr) return false;
  for (Isa isa : {Isa::kAuto, Isa::kGeneric, Isa::kAvx2}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kAuto:
    case Isa::kGeneric: return true;
    case Isa::kAvx2: return cpu_has_avx2();
  }
  return false;
}

bool set_isa(Isa isa) {
  if (!isa_supported(isa)) return false;
  g_requested.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

Isa requested_isa() { return static_cast<Isa>(g_requested.load(std::memory_order_relaxed)); }

Isa active_isa() {
  const Isa req = requested_isa();
  if (req != Isa::kAuto) return req;
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric;
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int default_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace dit_fast
