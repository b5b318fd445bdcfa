// Packed-weight fp32 GEMM (float32 or bf16 operands) with bias / bias + GELU epilogue (see gemm.h).
//
// Packed weight: for each K block k0 (kKc rows of W^T), the 16-column panels p in order, each
// kc x 16 floats (row k holds W[p*16 .. p*16+15][k0 + k], zero beyond N). It is rebuilt in every
// call, by all threads, in a per-caller-thread scratch buffer that only grows (no page faults for a
// fresh allocation per call; its contents never outlive the call, so nothing can go stale).
// x is read in place (float32) or widened row by row into a per-thread buffer (bf16).
// Rows are split into 6-row panels, each thread taking one contiguous, equal share of them, in
// M blocks of up to kMc rows. Loop nest per thread: M block -> K block -> column panel -> 6-row
// panel; the 16-column weight panel (kc x 16 floats, 16 KiB at kKc = 256) stays in L1 while the
// x rows of the block stream past it from L2.

#include "cpu/gemm.h"

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

using rowpar::from_acc;
using rowpar::to_acc;

// The 6 x rows a micro-kernel reads: rows [0, mr) of the panel at `a` (row stride lda); rows past
// mr repeat the last one (their results are discarded by the tile store).
struct Rows {
  const float* r[MR];
};
DIT_FORCEINLINE Rows panel_rows(const float* a, int64_t lda, int64_t mr) {
  Rows rows;
  for (int64_t i = 0; i < MR; ++i) rows.r[i] = a + std::min(i, mr - 1) * lda;
  return rows;
}

// One 6 x 16 tile's destinations: the float32 partial sums `part` (read unless in the first K
// block, written unless in the last) and the output `out` (written in the last K block: bias,
// GELU, rounding to T). For float32, part and out are the same memory.
template <typename T>
struct Tile {
  const float* bias;  // nullptr: none
  float* part;
  int64_t ldp;
  T* out;
  int64_t ldo, n0, mr, nr;
  bool first, last;  // first / last K block
  Epilogue ep;
};

// ---- generic micro-kernel and epilogue ----------------------------------------------------

DIT_FORCEINLINE void kernel_generic(int64_t kc, const Rows& a, const float* bp,
                                    float* acc /* MR x NR */) {
  for (int64_t i = 0; i < MR * NR; ++i) acc[i] = 0.f;
  for (int64_t k = 0; k < kc; ++k, bp += NR)
    for (int64_t i = 0; i < MR; ++i) {
      const float v = a.r[i][k];
      DIT_OMP_SIMD
      for (int64_t j = 0; j < NR; ++j) acc[i * NR + j] += v * bp[j];
    }
}

template <typename T>
DIT_FORCEINLINE void store_generic(const float* acc, const Tile<T>& t) {
  for (int64_t i = 0; i < t.mr; ++i) {
    float* p = t.part + i * t.ldp + t.n0;
    T* o = t.out + i * t.ldo + t.n0;
    for (int64_t j = 0; j < t.nr; ++j) {
      float v = acc[i * NR + j];
      if (!t.first) v += p[j];
      if (!t.last) {
        p[j] = v;
        continue;
      }
      if (t.bias) v += t.bias[t.n0 + j];
      if (t.ep == Epilogue::kGelu) v = gelu::forward<float>(v);
      from_acc(v, o + j);
    }
  }
}

// ---- AVX2 micro-kernel and epilogue ---------------------------------------------------------

#if DIT_CPU_HAVE_AVX2_PATH

#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))
#define DIT_GEMM_ROW(i)                                                   \
  {                                                                       \
    const __m256 a = _mm256_broadcast_ss(a##i + k);                       \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                            \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                            \
  }

// acc (MR x NR, 32-byte aligned) = rows (MR x kc) . bp (kc x NR); 12 accumulators in registers.
DIT_AVX2_FI void kernel_avx2(int64_t kc, const Rows& rows, const float* __restrict bp,
                             float* acc) {
  const float *a0 = rows.r[0], *a1 = rows.r[1], *a2 = rows.r[2], *a3 = rows.r[3],
              *a4 = rows.r[4], *a5 = rows.r[5];
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, bp += NR) {
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
template <typename T>
DIT_AVX2_FI void store_avx2(float* acc, const Tile<T>& t) {
  alignas(32) float zero_bias[NR] = {};
  alignas(32) float row[NR];
  const float* bias = zero_bias;
  const bool full = t.nr == NR;
  if (t.bias != nullptr && full) {
    bias = t.bias + t.n0;
  } else if (t.bias != nullptr) {
    for (int64_t j = 0; j < t.nr; ++j) zero_bias[j] = t.bias[t.n0 + j];
  }
  for (int64_t i = 0; i < t.mr; ++i) {
    float* p = t.part + i * t.ldp + t.n0;
    T* o = t.out + i * t.ldo + t.n0;
    float* src = acc + i * NR;
    if (!full && !t.first) {
      for (int64_t j = 0; j < t.nr; ++j) src[j] += p[j];
    }
    __m256 v0 = _mm256_load_ps(src), v1 = _mm256_load_ps(src + 8);
    if (full && !t.first) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p + 8));
    }
    if (t.last) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
      if (t.ep == Epilogue::kGelu) {
        v0 = avx2::gelu8(v0);
        v1 = avx2::gelu8(v1);
      }
    }
    if (full && t.last) {
      avx2::store8(o, v0);
      avx2::store8(o + 8, v1);
    } else if (full) {
      _mm256_storeu_ps(p, v0);
      _mm256_storeu_ps(p + 8, v1);
    } else {
      _mm256_store_ps(row, v0);
      _mm256_store_ps(row + 8, v1);
      for (int64_t j = 0; j < t.nr; ++j) {
        if (t.last) {
          from_acc(row[j], o + j);
        } else {
          p[j] = row[j];
        }
      }
    }
  }
}
#undef DIT_AVX2_FI

#endif  // DIT_CPU_HAVE_AVX2_PATH

// ---- driver ---------------------------------------------------------------------------------

template <typename T>
struct Problem {
  const T* x;
  int64_t ldx;
  const float* packed;
  const float* bias;  // float32 (a bf16 bias is widened once per call)
  T* out;
  int64_t ldo, M, N, K;
  Epilogue ep;
};

// Per-thread buffers (bf16 only; float32 reads x and sums into out in place): the M block's x rows
// widened (MC x KC floats) and its partial sums between K blocks (MC x N floats).
struct Scratch {
  float* x;
  float* part;
};

// M block [m0, m0 + mc) with the given micro-kernel / tile store.
template <typename T, typename Kernel, typename Store>
DIT_FORCEINLINE void run_block(const Problem<T>& p, int64_t m0, int64_t mc, const Scratch& s,
                               Kernel kernel, Store store) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  alignas(32) float acc[MR * NR];
  T* out = p.out + m0 * p.ldo;
  float* part;
  int64_t ldp;
  if constexpr (kF32) {
    part = out, ldp = p.ldo;
  } else {
    part = s.part, ldp = p.N;
  }
  const int64_t np = num_panels(p.N);
  for (int64_t k0 = 0; k0 < p.K; k0 += KC) {
    const int64_t kc = std::min(KC, p.K - k0);
    const float* a;
    int64_t lda;
    if constexpr (kF32) {
      a = p.x + m0 * p.ldx + k0, lda = p.ldx;
    } else {
      for (int64_t i = 0; i < mc; ++i) rowpar::load_row(p.x + (m0 + i) * p.ldx + k0, s.x + i * kc, kc);
      a = s.x, lda = kc;
    }
    for (int64_t j = 0; j < np; ++j) {
      const float* bp = p.packed + k0 * np * NR + j * kc * NR;
      const int64_t n0 = j * NR;
      for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        const int64_t mr = std::min(MR, mc - i0);
        kernel(kc, panel_rows(a + i0 * lda, lda, mr), bp, acc);
        store(acc, Tile<T>{p.bias, part + i0 * ldp, ldp, out + i0 * p.ldo, p.ldo, n0, mr,
                           std::min(NR, p.N - n0), k0 == 0, k0 + kc >= p.K, p.ep});
      }
    }
  }
}

template <typename T>
void block_generic(const Problem<T>& p, int64_t m0, int64_t mc, const Scratch& s) {
  run_block(p, m0, mc, s, kernel_generic, store_generic<T>);
}

#if DIT_CPU_HAVE_AVX2_PATH
template <typename T>
DIT_TARGET_AVX2 void block_avx2(const Problem<T>& p, int64_t m0, int64_t mc, const Scratch& s) {
  run_block(p, m0, mc, s, kernel_avx2, store_avx2<T>);
}
#endif

template <typename T>
using BlockFn = void (*)(const Problem<T>&, int64_t, int64_t, const Scratch&);

template <typename T>
BlockFn<T> pick_block() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) return &block_avx2<T>;
#endif
  return &block_generic<T>;
}

// Panel j of K block k0 of the packed weight. The 16 source rows of a panel are read side by
// side (16 streams through L1) so that the packed panel is written contiguously.
template <typename T>
void pack_panel(const T* w, int64_t N, int64_t K, int64_t k0, int64_t j, float* packed) {
  const int64_t np = num_panels(N), kc = std::min(KC, K - k0), nr = std::min(NR, N - j * NR);
  float* d = packed + k0 * np * NR + j * kc * NR;
  const T* s = w + j * NR * K + k0;
  for (int64_t k = 0; k < kc; ++k, d += NR) {
    for (int64_t c = 0; c < nr; ++c) d[c] = to_acc(s[c * K + k]);
    for (int64_t c = nr; c < NR; ++c) d[c] = 0.f;
  }
}

// The calling thread's packed-weight buffer, grown to at least n floats.
float* packed_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(n);
  }
  return buf.data();
}

// ---- few rows (M <= kGemmSmallM: adaLN's one row per sample) ---------------------------------
// No reordering: the GEMM is as much work as a pass over the weight, which it reads once, rows of
// W in place (bf16: each tile's 4 rows widened once into a per-thread buffer). Each thread takes
// an equal share of the output columns, in tiles of 4 columns x up to 3 rows: 12 accumulators of
// 8 k-lanes, reduced once per tile; the 4 weight rows of a tile stay in L1 while the row chunks
// pass over them. Every output element sums its K products in the same fixed order on any thread
// count.

constexpr int64_t SR = 3, SN = 4;  // rows, columns per few-rows tile

struct SmallProblem {
  const float* x;  // float32 rows (a bf16 x is widened once per call)
  int64_t ldx;
  const void* w;
  const float* bias;
  void* out;
  int64_t ldo, M, N, K;
  Epilogue ep;
};

template <typename T>
DIT_FORCEINLINE void small_store(const SmallProblem& p, int64_t m, int64_t n, float v) {
  if (p.bias) v += p.bias[n];
  if (p.ep == Epilogue::kGelu) v = gelu::forward<float>(v);
  from_acc(v, static_cast<T*>(p.out) + m * p.ldo + n);
}

// The 4 weight rows of the column tile at nb as float32 rows (rows past nr repeat the last one):
// in place for float32, widened into `buf` (SN x K floats) for bf16, once per tile.
template <typename T>
DIT_FORCEINLINE void tile_rows(const SmallProblem& p, int64_t nb, int64_t nr, float* buf,
                               const float* rows[SN]) {
  const T* w = static_cast<const T*>(p.w);
  for (int64_t j = 0; j < SN; ++j) {
    const T* src = w + (nb + std::min(j, nr - 1)) * p.K;
    if constexpr (std::is_same<T, float>::value) {
      rows[j] = src;
    } else {
      if (j < nr) rowpar::load_row(src, buf + j * p.K, p.K);
      rows[j] = buf + std::min(j, nr - 1) * p.K;
    }
  }
}

template <typename T>
void small_generic(const SmallProblem& p, int64_t n0, int64_t n1, float* buf) {
  for (int64_t nb = n0; nb < n1; nb += SN) {
    const int64_t nr = std::min(SN, n1 - nb);
    const float* wr[SN];
    tile_rows<T>(p, nb, nr, buf, wr);
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t m = 0; m < p.M; ++m) {
        const float* xr = p.x + m * p.ldx;
        float acc[8] = {};
        int64_t k = 0;
        for (; k + 8 <= p.K; k += 8)
          for (int l = 0; l < 8; ++l) acc[l] += xr[k + l] * wr[j][k + l];
        float v = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; k < p.K; ++k) v += xr[k] * wr[j][k];
        small_store<T>(p, m, nb + j, v);
      }
  }
}

#if DIT_CPU_HAVE_AVX2_PATH
#define DIT_AVX2_FI DIT_TARGET_AVX2 inline __attribute__((always_inline))

// The 8 lanes of each of a0..a3 summed: {sum(a0), sum(a1), sum(a2), sum(a3)}, pairwise as in
// small_generic ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)).
DIT_AVX2_FI __m128 fold8(__m256 a) {  // lanes j + 4 added to lanes j
  return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}
DIT_AVX2_FI __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m128 b0 = fold8(a0), b1 = fold8(a1), b2 = fold8(a2), b3 = fold8(a3);
  // (l0 + l1) and (l2 + l3) of each, then their sum
  return _mm_hadd_ps(_mm_hadd_ps(b0, b1), _mm_hadd_ps(b2, b3));
}

template <typename T>
DIT_TARGET_AVX2 void small_avx2(const SmallProblem& p, int64_t n0, int64_t n1, float* buf) {
  const int64_t K8 = p.K / 8 * 8;
  for (int64_t nb = n0; nb < n1; nb += SN) {
    const int64_t nr = std::min(SN, n1 - nb);
    const float* wr[SN];
    tile_rows<T>(p, nb, nr, buf, wr);
    for (int64_t mb = 0; mb < p.M; mb += SR) {
      const int64_t mr = std::min(SR, p.M - mb);
      const float* xr[SR];
      for (int64_t i = 0; i < SR; ++i) xr[i] = p.x + (mb + std::min(i, mr - 1)) * p.ldx;
      __m256 c[SR][SN];
      for (int64_t i = 0; i < SR; ++i)
        for (int64_t j = 0; j < SN; ++j) c[i][j] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 b0 = _mm256_loadu_ps(wr[0] + k), b1 = _mm256_loadu_ps(wr[1] + k),
                     b2 = _mm256_loadu_ps(wr[2] + k), b3 = _mm256_loadu_ps(wr[3] + k);
        for (int64_t i = 0; i < SR; ++i) {
          const __m256 a = _mm256_loadu_ps(xr[i] + k);
          c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
          c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
          c[i][2] = _mm256_fmadd_ps(a, b2, c[i][2]);
          c[i][3] = _mm256_fmadd_ps(a, b3, c[i][3]);
        }
      }
      for (int64_t i = 0; i < mr; ++i) {
        alignas(16) float v[SN];
        _mm_store_ps(v, hsum4(c[i][0], c[i][1], c[i][2], c[i][3]));
        for (int64_t j = 0; j < nr; ++j) {
          for (int64_t k = K8; k < p.K; ++k) v[j] += xr[i][k] * wr[j][k];
          small_store<T>(p, mb + i, nb + j, v[j]);
        }
      }
    }
  }
}
#undef DIT_AVX2_FI
#endif  // DIT_CPU_HAVE_AVX2_PATH

template <typename T>
Status small_forward(const T* x, int64_t ldx, const T* w, const float* bias, T* out, int64_t ldo,
                     int64_t M, int64_t N, int64_t K, Epilogue epilogue, int num_threads) {
  std::vector<float> x32;  // bf16 rows widened once (M x K floats)
  const float* xf;
  int64_t ldxf = ldx;
  if constexpr (std::is_same<T, float>::value) {
    xf = x;
  } else {
    x32.resize(M * K);
    for (int64_t m = 0; m < M; ++m) rowpar::load_row(x + m * ldx, x32.data() + m * K, K);
    xf = x32.data(), ldxf = K;
  }
  const SmallProblem p{xf, ldxf, w, bias, out, ldo, M, N, K, epilogue};
  void (*fn)(const SmallProblem&, int64_t, int64_t, float*) = &small_generic<T>;
#if DIT_CPU_HAVE_AVX2_PATH
  if (active_isa() == Isa::kAvx2) fn = &small_avx2<T>;
#endif
  const int64_t tiles = (N + SN - 1) / SN;
  const int nt = rowpar::resolve_threads(num_threads, tiles, M * N * K / 16);
  // per-thread buffers, allocated here: nothing may throw inside the parallel region
  const int64_t buf_numel = std::is_same<T, float>::value ? 0 : SN * K;
  std::unique_ptr<float[]> bufs(new float[nt * buf_numel + 1]);  // uninitialized
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    fn(p, std::min(N, tiles * tid / nth * SN), std::min(N, tiles * (tid + 1) / nth * SN),
       bufs.get() + tid * buf_numel);
  }
#else
  (void)nt;
  fn(p, 0, N, bufs.get());
#endif
  return Status::kOk;
}

template <typename T>
Status forward(const T* x, int64_t ldx, const T* w, const T* bias, T* out, int64_t ldo, int64_t M,
               int64_t N, int64_t K, Epilogue epilogue, int num_threads) {
  if (M < 0 || N < 0 || K < 0 || ldx < K || ldo < N) return Status::kInvalidArgument;
  if (epilogue != Epilogue::kNone && epilogue != Epilogue::kGelu) return Status::kInvalidArgument;
  if (M == 0 || N == 0) return Status::kOk;
  if (x == nullptr || out == nullptr || (K > 0 && w == nullptr)) return Status::kInvalidArgument;
  std::unique_ptr<float[]> bias32;
  if (bias != nullptr) {
    bias32.reset(new float[N]);
    for (int64_t n = 0; n < N; ++n) bias32[n] = to_acc(bias[n]);
  }
  if (K == 0) {  // empty sum: the epilogue of the bias alone
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float v = bias32 ? bias32[n] : 0.f;
        from_acc(epilogue == Epilogue::kGelu ? gelu::forward<float>(v) : v, out + m * ldo + n);
      }
    return Status::kOk;
  }
  if (M <= kGemmSmallM)
    return small_forward(x, ldx, w, bias32.get(), out, ldo, M, N, K, epilogue, num_threads);
  const int64_t np = num_panels(N), nkb = (K + KC - 1) / KC, row_panels = (M + MR - 1) / MR;
  float* packed = packed_scratch(K * np * NR);
  const Problem<T> p{x, ldx, packed, bias32.get(), out, ldo, M, N, K, epilogue};
  const BlockFn<T> block = pick_block<T>();
  constexpr bool kF32 = std::is_same<T, float>::value;
  const int nt = rowpar::resolve_threads(num_threads, row_panels, M * N * K / 64);
  // per-thread buffers (bf16: widened x rows, then partial sums; untouched if K <= KC), allocated
  // here: nothing may throw inside the parallel region
  const int64_t scratch_per_thread = kF32 ? 0 : MC * KC + MC * N;
  std::unique_ptr<float[]> scratch(new float[nt * scratch_per_thread + 1]);  // uninitialized
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#else
  (void)nt;
#endif
  {
#ifdef _OPENMP
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#pragma omp for schedule(static)
#else
    const int64_t tid = 0, nth = 1;
#endif
    for (int64_t q = 0; q < nkb * np; ++q) pack_panel(w, N, K, (q / np) * KC, q % np, packed);
    // (implicit barrier: the packed weight is complete)
    float* mine = scratch.get() + tid * scratch_per_thread;
    const Scratch s{mine, kF32 ? nullptr : mine + MC * KC};
    // This thread's equal share of the 6-row panels, in M blocks of up to MC rows. Each output
    // element's sums do not depend on the blocking, so results do not depend on the thread count.
    const int64_t p0 = row_panels * tid / nth, p1 = row_panels * (tid + 1) / nth;
    for (int64_t b = p0; b < p1; b += MC / MR) {
      const int64_t m0 = b * MR, m1 = std::min(std::min(p1, b + MC / MR) * MR, M);
      block(p, m0, m1 - m0, s);
    }
  }
  return Status::kOk;
}

}  // namespace

Status linear_fwd(const float* x, int64_t ldx, const float* w, const float* bias, float* out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, Epilogue epilogue,
                  int num_threads) {
  return forward(x, ldx, w, bias, out, ldo, M, N, K, epilogue, num_threads);
}
Status linear_fwd(const bf16* x, int64_t ldx, const bf16* w, const bf16* bias, bf16* out,
                  int64_t ldo, int64_t M, int64_t N, int64_t K, Epilogue epilogue,
                  int num_threads) {
  return forward(x, ldx, w, bias, out, ldo, M, N, K, epilogue, num_threads);
}

}  // namespace cpu
}  // namespace dit_fast
