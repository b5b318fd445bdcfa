// Portability macros shared by the torch-free CPU and CUDA kernels.
#pragma once

// DIT_HD marks small math helpers that are compiled for both host and device.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DIT_HD __host__ __device__
#define DIT_FORCEINLINE __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define DIT_HD
#define DIT_FORCEINLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define DIT_HD
#define DIT_FORCEINLINE __forceinline
#else
#define DIT_HD
#define DIT_FORCEINLINE inline
#endif

// `DIT_HD_FI` = host/device + force-inline. Force-inlining matters on the CPU: the row kernels
// are instantiated once per ISA (generic, AVX2) through `__attribute__((target))` wrappers and
// the helpers must be inlined into each wrapper to be compiled for that ISA.
#define DIT_HD_FI DIT_HD DIT_FORCEINLINE

#define DIT_STRINGIFY_(x) #x
#define DIT_STRINGIFY(x) DIT_STRINGIFY_(x)

// `#pragma omp simd` for host loops: active with -fopenmp (or -fopenmp-simd plus
// -DDIT_HAVE_OPENMP_SIMD), a no-op under nvcc.
#if !defined(__CUDACC__) && (defined(_OPENMP) || defined(DIT_HAVE_OPENMP_SIMD))
#define DIT_OMP_SIMD _Pragma("omp simd")
#define DIT_OMP_SIMD_SUM(...) _Pragma(DIT_STRINGIFY(omp simd reduction(+ : __VA_ARGS__)))
#else
#define DIT_OMP_SIMD
#define DIT_OMP_SIMD_SUM(...)
#endif
