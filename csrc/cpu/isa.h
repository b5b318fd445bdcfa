// Runtime CPU-ISA selection for the torch-free CPU kernels.
//
// Each kernel is compiled twice from the same C++ source: a generic build (whatever the
// compiler's baseline is, e.g. SSE2 on x86-64) and, on x86 with GCC/Clang, an AVX2+FMA build via
// `__attribute__((target("avx2,fma")))`. The choice is made at run time with
// `__builtin_cpu_supports`; the generic build is the scalar/baseline fallback and always exists.
#pragma once

namespace dit_fast {
namespace cpu {

enum class Isa : int {
  kAuto = 0,     // best supported (default)
  kGeneric = 1,  // compiler baseline
  kAvx2 = 2,     // x86-64 AVX2 + FMA
};

const char* isa_name(Isa isa);
// Parses "auto" | "generic" | "avx2"; returns false for an unknown name.
bool parse_isa(const char* name, Isa* out);
// True if this binary contains the code path and this CPU can run it (kAuto, kGeneric: always).
bool isa_supported(Isa isa);
// Forces an ISA (kAuto restores automatic choice). Returns false (and changes nothing) when
// `isa_supported(isa)` is false. Process-wide; meant for tests and benchmarks.
bool set_isa(Isa isa);
// The requested ISA (kAuto unless set_isa was called).
Isa requested_isa();
// The ISA the kernels will use now (never kAuto).
Isa active_isa();
// True if the kernels were compiled with OpenMP (multi-threaded over rows).
bool has_openmp();
// Threads a kernel launched with num_threads <= 0 will use.
int default_num_threads();

}  // namespace cpu
}  // namespace dit_fast

// DIT_CPU_HAVE_AVX2_PATH: whether the AVX2 clones are compiled into this binary.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DIT_CPU_DISABLE_AVX2)
#define DIT_CPU_HAVE_AVX2_PATH 1
#define DIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DIT_CPU_HAVE_AVX2_PATH 0
#endif
