// CPU implementation of the sinusoidal timestep embedding (see cpu/timestep_embed.h).
// Tiny: N x dim outputs; OpenMP over rows only for large batches; the row loop is vectorized
// (generic and AVX2 clones, picked at run time).

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // lets the selects in sincos_vec vectorize
#endif

#include "cpu/timestep_embed.h"

#include "common/bf16.h"
#include "cpu/isa.h"
#include "common/timestep_embed.h"
#include "cpu/embed_common.h"

namespace dit_fast {
namespace cpu {
namespace {

namespace te = ::dit_fast::timestep_embed;

// t[n] as float32, rounded like torch's `t.float()`.
inline float load_t(IndexDType dt, const void* t, int64_t i) {
  switch (dt) {
    case IndexDType::kFloat32: return static_cast<const float*>(t)[i];
    case IndexDType::kFloat64: return static_cast<float>(static_cast<const double*>(t)[i]);
    case IndexDType::kInt32: return static_cast<float>(static_cast<const int32_t*>(t)[i]);
    case IndexDType::kInt64: return static_cast<float>(static_cast<const int64_t*>(t)[i]);
  }
  return 0.0f;
}

// cos and sin of a float32 argument, branch-free so that the row loop vectorizes (the C
// library's cosf / sinf do not): Cephes' reduction by pi/4 in three parts (accurate for
// |x| < 8192; DiT's arguments are t * freq <= ~1000) and its minimax polynomials on [-pi/4, pi/4].
// Measured on [-1100, 1100]: <= 7.8e-8 absolute error (<= 1 ulp of results near 1; the C
// library: 3.3e-8), so the embedding matches the official one to ~1e-7. Timesteps with
// |t| >= 8192 use the C library instead.
DIT_FORCEINLINE void sincos_vec(float x, float& c_out, float& s_out) {
  const float ax = x < 0.0f ? -x : x;
  int32_t j = static_cast<int32_t>(ax * 1.27323954473516f);  // 4 / pi
  j += j & 1;                                                 // even octant
  const float y = static_cast<float>(j);
  const float z = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float zz = z * z;
  const float sp = ((-1.9515295891e-4f * zz + 8.3321608736e-3f) * zz - 1.6666654611e-1f) * zz * z + z;
  const float cp = ((2.443315711809948e-5f * zz - 1.388731625493765e-3f) * zz +
                    4.166664568298827e-2f) * zz * zz - 0.5f * zz + 1.0f;
  const int32_t q = (j >> 1) & 3;  // quadrant
  const bool swap = q & 1;
  float sv = swap ? cp : sp;
  float cv = swap ? sp : cp;
  sv = (q & 2) ? -sv : sv;
  cv = ((q + 1) & 2) ? -cv : cv;
  s_out = x < 0.0f ? -sv : sv;
  c_out = cv;
}

template <typename O>
DIT_FORCEINLINE void row_impl(float tv, const float* freqs, O* row, int64_t half, int64_t dim) {
  DIT_OMP_SIMD
  for (int64_t i = 0; i < half; ++i) {
    float c, s;
    const float arg = tv * freqs[i];
    sincos_vec(arg, c, s);
    row[i] = embed::from_acc<O>(c);
    row[half + i] = embed::from_acc<O>(s);
  }
  if (dim % 2) row[dim - 1] = embed::from_acc<O>(0.0f);
}

template <typename O>
void row_generic(float tv, const float* freqs, O* row, int64_t half, int64_t dim) {
  row_impl<O>(tv, freqs, row, half, dim);
}
#if DIT_CPU_HAVE_AVX2_PATH
template <typename O>
DIT_TARGET_AVX2 void row_avx2(float tv, const float* freqs, O* row, int64_t half, int64_t dim) {
  row_impl<O>(tv, freqs, row, half, dim);
}
#endif

template <typename O>
void run(IndexDType t_dtype, const void* t, int64_t t_stride, const float* freqs, O* out,
         int64_t N, int64_t dim, int num_threads) {
  const int64_t half = dim / 2;
  void (*fn)(float, const float*, O*, int64_t, int64_t) = &row_generic<O>;
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) fn = &row_avx2<O>;
#endif
  // The reduction is exact only for |t * freq| < 8192 (freqs <= 1): otherwise use the C library.
  bool small = true;
  for (int64_t n = 0; n < N; ++n) {
    const float tv = load_t(t_dtype, t, n * t_stride);
    small = small && tv > -8192.0f && tv < 8192.0f;
  }
  const int nt = embed::resolve_threads(num_threads, N, N * dim * 16);
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t n = 0; n < N; ++n) {
    const float tv = load_t(t_dtype, t, n * t_stride);
    O* row = out + n * dim;
    if (small) {
      fn(tv, freqs, row, half, dim);
    } else {
      for (int64_t i = 0; i < half; ++i) {
        float c, s;
        te::embed_pair(tv, freqs[i], c, s);
        row[i] = embed::from_acc<O>(c);
        row[half + i] = embed::from_acc<O>(s);
      }
      if (dim % 2) row[dim - 1] = embed::from_acc<O>(0.0f);
    }
  }
  (void)nt;
}

}  // namespace

Status timestep_embedding(IndexDType t_dtype, const void* t, int64_t t_stride, const float* freqs,
                          DType out_dtype, void* out, int64_t N, int64_t dim, int num_threads) {
  if (N < 0 || dim < 0) return Status::kInvalidArgument;
  if (N * dim == 0) return Status::kOk;
  switch (out_dtype) {
    case DType::kFloat32:
      run<float>(t_dtype, t, t_stride, freqs, static_cast<float*>(out), N, dim, num_threads);
      return Status::kOk;
    case DType::kBFloat16:
      run<bf16>(t_dtype, t, t_stride, freqs, static_cast<bf16*>(out), N, dim, num_threads);
      return Status::kOk;
    case DType::kFloat64:  // the float32 embedding, widened (exact), like `.to(torch.float64)`
      run<double>(t_dtype, t, t_stride, freqs, static_cast<double*>(out), N, dim, num_threads);
      return Status::kOk;
    default: return Status::kUnsupportedDType;
  }
}

}  // namespace cpu
}  // namespace dit_fast
