// CPU implementation of the Taylor forecast (see cpu/forecast.h). OpenMP over chunks of the
// feature, each chunk accumulated over the K factors in a stack buffer (simple loops the compiler
// vectorizes). Contraction into fused multiply-adds is off in this translation unit, so the AVX2
// clone and the generic code round exactly like the reference's separate multiply and add.

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cpu/forecast.h"

#include "common/bf16.h"
#include "cpu/embed_common.h"
#include "cpu/isa.h"

namespace dit_fast {
namespace cpu {
namespace {

using embed::from_acc;

constexpr int64_t kChunk = 512;  // elements per work item (a stack buffer of accumulators)

template <typename To, typename A>
DIT_FORCEINLINE void chunk_impl(To* out, const A* factors, const A* w, int64_t K, int64_t M,
                                int64_t m0) {
  const int64_t len = M - m0 < kChunk ? M - m0 : kChunk;
  alignas(64) A acc[kChunk];
  const A* f = factors + m0;
  const A w0 = w[0];
  DIT_OMP_SIMD
  for (int64_t j = 0; j < len; ++j) acc[j] = f[j] * w0;
  for (int64_t i = 1; i < K; ++i) {
    const A* fi = f + i * M;
    const A wi = w[i];
    DIT_OMP_SIMD
    for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + fi[j] * wi;
  }
  To* o = out + m0;
  DIT_OMP_SIMD
  for (int64_t j = 0; j < len; ++j) o[j] = from_acc<To>(acc[j]);
}

template <typename To, typename A>
void chunk_generic(To* out, const A* factors, const A* w, int64_t K, int64_t M, int64_t m0) {
  chunk_impl<To, A>(out, factors, w, K, M, m0);
}
#if DIT_CPU_HAVE_AVX2_PATH
template <typename To, typename A>
DIT_TARGET_AVX2 void chunk_avx2(To* out, const A* factors, const A* w, int64_t K, int64_t M,
                                int64_t m0) {
  chunk_impl<To, A>(out, factors, w, K, M, m0);
}
#endif

template <typename To, typename A>
void drive(void* out, const void* factors, const double* weights, int64_t K, int64_t M,
           int num_threads) {
  using Fn = void (*)(To*, const A*, const A*, int64_t, int64_t, int64_t);
  Fn fn = &chunk_generic<To, A>;
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) fn = &chunk_avx2<To, A>;
#endif
  A w[kForecastMaxFactors];
  for (int64_t i = 0; i < K; ++i) w[i] = static_cast<A>(weights[i]);
  To* o = static_cast<To*>(out);
  const A* f = static_cast<const A*>(factors);
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const int nt = embed::resolve_threads(num_threads, chunks, M * (K + 1));
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t c = 0; c < chunks; ++c) fn(o, f, w, K, M, c * kChunk);
  (void)nt;
}

}  // namespace

Status taylor_forecast(DType out_dtype, void* out, DType factor_dtype, const void* factors,
                       const double* weights, int64_t K, int64_t M, int num_threads) {
  if (K < 1 || K > kForecastMaxFactors || M < 0) return Status::kInvalidArgument;
  if (M == 0) return Status::kOk;
  using D = DType;
  if (factor_dtype == D::kFloat64) {
    if (out_dtype != D::kFloat64) return Status::kUnsupportedDType;
    drive<double, double>(out, factors, weights, K, M, num_threads);
  } else if (factor_dtype == D::kFloat32 && out_dtype == D::kFloat32) {
    drive<float, float>(out, factors, weights, K, M, num_threads);
  } else if (factor_dtype == D::kFloat32 && out_dtype == D::kBFloat16) {
    drive<bf16, float>(out, factors, weights, K, M, num_threads);
  } else {
    return Status::kUnsupportedDType;
  }
  return Status::kOk;
}

}  // namespace cpu
}  // namespace dit_fast
