// Packed-weight fp32 GEMM with bias / bias + GELU epilogue (see gemm.h).
//
// Packed weight: for each K block k0 (kKc rows of W^T), the 16-column panels p in order, each
// kc x 16 floats (row k holds W[p*16 .. p*16+15][k0 + k], zero beyond N). Packed x (per thread):
// 6-row panels, each kc x 6 floats (column i holds x row i, zero beyond M).
// Loop nest per thread: M block (kMc rows) -> K block (pack x) -> column panel -> 6-row panel;
// the 16-column weight panel (kc x 16 floats, 16 KiB at kKc = 256) stays in L1 while the x
// panels of the block stream past it from L2.

#include "cpu/gemm.h"

#include <algorithm>
#include <memory>

#include "common/gelu.h"
#include "common/macros.h"
#include "cpu/gelu_avx2.h"
#include "cpu/isa.h"
#include "cpu/row_parallel.h"

namespace dit_fast {
namespace cpu {
namespace {

constexpr int64_t MR = kGemmMr, NR = kGemmNr, KC = kGemmKc, MC = kGemmMc;

int64_t num_panels(int64_t N) { return (N + NR - 1) / NR; }

// x rows [m0, m0 + mc) (m0 + mc <= M), columns [k0, k0 + kc) -> 6-row panels.
void pack_x(const float* x, int64_t ldx, int64_t m0, int64_t mc, int64_t k0, int64_t kc,
            float* dst) {
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    float* d = dst + i0 * kc;
    const int64_t mr = std::min(MR, mc - i0);
    for (int64_t i = 0; i < MR; ++i) {
      if (i < mr) {
        const float* s = x + (m0 + i0 + i) * ldx + k0;
        for (int64_t k = 0; k < kc; ++k) d[k * MR + i] = s[k];
      } else {
        for (int64_t k = 0; k < kc; ++k) d[k * MR + i] = 0.f;
      }
    }
  }
}

struct Tile {
  const float* bias;  // nullptr: none
  float* out;
  int64_t ldo, n0, mr, nr;
  bool first, last;   // first / last K block
  Epilogue ep;
};

// ---- generic micro-kernel and epilogue ----------------------------------------------------

DIT_FORCEINLINE void kernel_generic(int64_t kc, const float* ap, const float* bp,
                                    float* acc /* MR x NR */) {
  for (int64_t i = 0; i < MR * NR; ++i) acc[i] = 0.f;
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR)
    for (int64_t i = 0; i < MR; ++i) {
      const float a = ap[i];
      DIT_OMP_SIMD
      for (int64_t j = 0; j < NR; ++j) acc[i * NR + j] += a * bp[j];
    }
}

DIT_FORCEINLINE void store_generic(const float* acc, const Tile& t) {
  for (int64_t i = 0; i < t.mr; ++i) {
    float* o = t.out + i * t.ldo + t.n0;
    for (int64_t j = 0; j < t.nr; ++j) {
      float v = acc[i * NR + j];
      if (!t.first) v += o[j];
      if (t.last) {
        if (t.bias) v += t.bias[t.n0 + j];
        if (t.ep == Epilogue::kGelu) v = gelu::forward<float>(v);
      }
      o[j] = v;
    }
  }
}

// ---- AVX2 micro-kernel and epilogue ---------------------------------------------------------

#if DIT_CPU_HAVE_AVX2_PATH

#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))
#define DIT_GEMM_ROW(i)                                                   \
  {                                                                       \
    const __m256 a = _mm256_broadcast_ss(ap + i);                         \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                            \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                            \
  }

// acc (MR x NR, 32-byte aligned) = ap (kc x MR) . bp (kc x NR); 12 accumulators in registers.
DIT_AVX2_FI void kernel_avx2(int64_t kc, const float* __restrict ap, const float* __restrict bp,
                             float* acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, ap += MR, bp += NR) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    DIT_GEMM_ROW(0) DIT_GEMM_ROW(1) DIT_GEMM_ROW(2) DIT_GEMM_ROW(3) DIT_GEMM_ROW(4) DIT_GEMM_ROW(5)
  }
  const __m256 c[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(acc + i * NR, c[i][0]);
    _mm256_store_ps(acc + i * NR + 8, c[i][1]);
  }
}
#undef DIT_GEMM_ROW

// Full 16-wide rows in vector code; a partial panel (nr < 16) goes through a 16-float buffer
// with the same vector math, so every element of `out` gets identical arithmetic.
DIT_AVX2_FI void store_avx2(float* acc, const Tile& t) {
  alignas(32) float zero_bias[NR] = {};
  alignas(32) float row[NR];
  const float* bias = zero_bias;
  if (t.bias != nullptr && t.nr == NR) {
    bias = t.bias + t.n0;
  } else if (t.bias != nullptr) {
    for (int64_t j = 0; j < t.nr; ++j) zero_bias[j] = t.bias[t.n0 + j];
  }
  for (int64_t i = 0; i < t.mr; ++i) {
    float* o = t.out + i * t.ldo + t.n0;
    const bool full = t.nr == NR;
    float* src = acc + i * NR;
    if (!full && !t.first) {
      for (int64_t j = 0; j < t.nr; ++j) src[j] += o[j];
    }
    __m256 v0 = _mm256_load_ps(src), v1 = _mm256_load_ps(src + 8);
    if (full && !t.first) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(o));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(o + 8));
    }
    if (t.last) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
      if (t.ep == Epilogue::kGelu) {
        v0 = avx2::gelu8(v0);
        v1 = avx2::gelu8(v1);
      }
    }
    if (full) {
      _mm256_storeu_ps(o, v0);
      _mm256_storeu_ps(o + 8, v1);
    } else {
      _mm256_store_ps(row, v0);
      _mm256_store_ps(row + 8, v1);
      for (int64_t j = 0; j < t.nr; ++j) o[j] = row[j];
    }
  }
}
#undef DIT_AVX2_FI

#endif  // DIT_CPU_HAVE_AVX2_PATH

// ---- driver ---------------------------------------------------------------------------------

struct Problem {
  const float* x;
  int64_t ldx;
  const float* packed;
  const float* bias;
  float* out;
  int64_t ldo, M, N, K;
  Epilogue ep;
};

// M block [m0, m0 + mc) with the given micro-kernel / tile store; xbuf: MC * KC floats.
template <typename Kernel, typename Store>
DIT_FORCEINLINE void run_block(const Problem& p, int64_t m0, int64_t mc, float* xbuf,
                               float* acc, Kernel kernel, Store store) {
  const int64_t np = num_panels(p.N);
  for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
    const int64_t kc = std::min(KC, p.K - k0);
    pack_x(p.x, p.ldx, m0, mc, k0, kc, xbuf);
    for (int64_t j = 0; j < np; ++j) {
      const float* bp = p.packed + k0 * np * NR + j * kc * NR;
      const int64_t n0 = j * NR;
      for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        kernel(kc, xbuf + i0 * kc, bp, acc);
        const Tile t{p.bias, p.out + (m0 + i0) * p.ldo, p.ldo, n0, std::min(MR, mc - i0),
                     std::min(NR, p.N - n0), k0 == 0, k0 + kc >= p.K, p.ep};
        store(acc, t);
      }
    }
  }
}

void block_generic(const Problem& p, int64_t m0, int64_t mc, float* xbuf, float* acc) {
  run_block(p, m0, mc, xbuf, acc, kernel_generic, store_generic);
}

#if DIT_CPU_HAVE_AVX2_PATH
DIT_TARGET_AVX2 void block_avx2(const Problem& p, int64_t m0, int64_t mc, float* xbuf,
                                float* acc) {
  run_block(p, m0, mc, xbuf, acc, kernel_avx2, store_avx2);
}
#endif

using BlockFn = void (*)(const Problem&, int64_t, int64_t, float*, float*);

BlockFn pick_block() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &block_avx2;
#endif
  return &block_generic;
}

}  // namespace

int64_t linear_packed_numel(int64_t N, int64_t K) { return K * num_panels(N) * NR; }

Status linear_pack(const float* w, int64_t N, int64_t K, float* packed) {
  if (N < 0 || K < 0 || (N * K > 0 && (w == nullptr || packed == nullptr)))
    return Status::kInvalidArgument;
  // Single-threaded on purpose: 0.05-0.3 ms at DiT-S/2's shapes, and an extra parallel region per
  // call costs more than that on a loaded machine. The 16 source rows of a panel are read side by
  // side (16 streams through L1) so that the packed panel is written contiguously.
  const int64_t np = num_panels(N);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t j = 0; j < np; ++j) {
      const int64_t nr = std::min(NR, N - j * NR);
      float* d = packed + k0 * np * NR + j * kc * NR;
      const float* s = w + j * NR * K + k0;
      for (int64_t k = 0; k < kc; ++k, d += NR) {
        for (int64_t c = 0; c < nr; ++c) d[c] = s[c * K + k];
        for (int64_t c = nr; c < NR; ++c) d[c] = 0.f;
      }
    }
  }
  return Status::kOk;
}

Status linear_packed_fwd(const float* x, int64_t ldx, const float* packed, const float* bias,
                         float* out, int64_t ldo, int64_t M, int64_t N, int64_t K,
                         Epilogue epilogue, int num_threads) {
  if (M < 0 || N < 0 || K < 0 || ldx < K || ldo < N) return Status::kInvalidArgument;
  if (epilogue != Epilogue::kNone && epilogue != Epilogue::kGelu) return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (K == 0) {  // empty sum: the epilogue of the bias alone
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float v = bias ? bias[n] : 0.f;
        out[m * ldo + n] = epilogue == Epilogue::kGelu ? gelu::forward<float>(v) : v;
      }
    return Status::kOk;
  }
  const Problem p{x, ldx, packed, bias, out, ldo, M, N, K, epilogue};
  const BlockFn block = pick_block();
  const int64_t nblocks = (M + MC - 1) / MC;
  const int nt = rowpar::resolve_threads(num_threads, nblocks, M * N * K / 64);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#else
  (void)nt;
#endif
  {
    std::unique_ptr<float[]> xbuf(new float[MC * KC + 8]);
    alignas(32) float acc[MR * NR];
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t m0 = b * MC;
      block(p, m0, std::min(MC, M - m0), xbuf.get(), acc);
    }
  }
  return Status::kOk;
}

}  // namespace cpu
}  // namespace dit_fast
