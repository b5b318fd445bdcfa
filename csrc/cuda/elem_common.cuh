// Device helpers shared by the element-wise / row CUDA kernels (ln_modulate.cu, gated_residual.cu,
// gelu.cu; the storage conversions also by the embedding kernels through embed_io.cuh): storage <->
// accumulator conversion, 16-byte vector loads / stores, launch geometry, and fixed-order
// (deterministic) block reductions. Only explicit conversion intrinsics are used, so the kernels
// also compile under torch's -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace dit_fast {
namespace cuda {
namespace elem {

// Io<T>: A is the math type (float, or double for double storage); to_acc / from_acc convert one
// value (from_acc rounds to nearest even); load / store / round (v rounded to T and widened back:
// what a store followed by a load gives) are built on them.
template <typename T>
struct IoBase;
template <>
struct IoBase<float> {
  using A = float;
  static __device__ __forceinline__ A to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(A v) { return v; }
};
template <>
struct IoBase<double> {
  using A = double;
  static __device__ __forceinline__ A to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(A v) { return v; }
};
template <>
struct IoBase<__half> {
  using A = float;
  static __device__ __forceinline__ A to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(A v) { return __float2half_rn(v); }
};
template <>
struct IoBase<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(A v) { return __float2bfloat16_rn(v); }
};

template <typename T>
struct Io : IoBase<T> {
  using A = typename IoBase<T>::A;
  static __device__ __forceinline__ A load(const T* p) { return IoBase<T>::to_acc(*p); }
  static __device__ __forceinline__ void store(T* p, A v) { *p = IoBase<T>::from_acc(v); }
  static __device__ __forceinline__ A round(A v) {
    return IoBase<T>::to_acc(IoBase<T>::from_acc(v));
  }
};

// ---- vector access ----------------------------------------------------------------------------

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Raw bits of one storage value, zero-extended, and back.
__device__ __forceinline__ unsigned long long raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned long long raw_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(v));
}
__device__ __forceinline__ unsigned long long raw_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned long long raw_bits(__nv_bfloat16 v) {
  return __bfloat16_as_ushort(v);
}
template <typename T>
__device__ __forceinline__ T from_raw(unsigned long long b);
template <>
__device__ __forceinline__ float from_raw<float>(unsigned long long b) {
  return __uint_as_float(static_cast<unsigned>(b));
}
template <>
__device__ __forceinline__ double from_raw<double>(unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(b));
}
template <>
__device__ __forceinline__ __half from_raw<__half>(unsigned long long b) {
  return __ushort_as_half(static_cast<unsigned short>(b));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_raw<__nv_bfloat16>(unsigned long long b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}

// V consecutive elements of T (V * sizeof(T) in {2, 4, 8, 16} bytes, the pointer aligned to that
// size) move as ONE integer access: a 16-byte load / store for V = kVec16<T>. The elements are
// packed into 64-bit words by shifts.
template <int B>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = unsigned long long;
};
template <>
struct Word<16> {
  using type = ulonglong2;
};

template <typename T, int V>
struct VecIo {
  static constexpr int kBytes = static_cast<int>(sizeof(T)) * V;
  static constexpr int kWords = (kBytes + 7) / 8;
  using W = typename Word<kBytes>::type;

  static __device__ __forceinline__ void read(const T* p, unsigned long long (&q)[kWords]) {
    const W w = *reinterpret_cast<const W*>(p);
    if constexpr (kBytes == 16) {
      q[0] = w.x;
      q[1] = w.y;
    } else {
      q[0] = w;
    }
  }
  static __device__ __forceinline__ void write(T* p, const unsigned long long (&q)[kWords]) {
    if constexpr (kBytes == 16) {
      // inline PTX: a plain 16-byte store of a vector type is sometimes split by the compiler
      asm volatile("st.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(q[0]), "l"(q[1]) : "memory");
    } else {
      *reinterpret_cast<W*>(p) = static_cast<W>(q[0]);
    }
  }
  static __device__ __forceinline__ T get(const unsigned long long (&q)[kWords], int i) {
    constexpr int kBits = 8 * static_cast<int>(sizeof(T));
    const int bit = i * kBits;
    const unsigned long long mask = kBits == 64 ? ~0ull : ((1ull << (kBits % 64)) - 1);
    return from_raw<T>((q[bit / 64] >> (bit % 64)) & mask);
  }
  static __device__ __forceinline__ void put(unsigned long long (&q)[kWords], int i, T v) {
    const int bit = i * 8 * static_cast<int>(sizeof(T));
    q[bit / 64] |= raw_bits(v) << (bit % 64);
  }
};

// out[i] = p[i] widened, i < V.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, typename Io<T>::A (&out)[V]) {
  using VI = VecIo<T, V>;
  unsigned long long q[VI::kWords];
  VI::read(p, q);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = Io<T>::to_acc(VI::get(q, i));
}

// Stores v rounded to T; then v[i] = the stored value widened when kRound (later math then uses
// exactly what was stored).
template <typename T, int V, bool kRound = false>
__device__ __forceinline__ void store_vec(T* p, typename Io<T>::A (&v)[V]) {
  using VI = VecIo<T, V>;
  unsigned long long q[VI::kWords];
#pragma unroll
  for (int w = 0; w < VI::kWords; ++w) q[w] = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const T t = Io<T>::from_acc(v[i]);
    VI::put(q, i, t);
    if (kRound) v[i] = Io<T>::to_acc(t);
  }
  VI::write(p, q);
}

// True when rows of `row_len` elements can be read in 16-byte vectors: the length, every base
// pointer and every row stride are multiples of the vector (callers then use V = kVec16<T>,
// otherwise V = 1).
template <typename T>
inline bool vec16_ok(int64_t row_len, std::initializer_list<const void*> ptrs,
                     std::initializer_list<int64_t> strides = {}) {
  constexpr int64_t V = kVec16<T>;
  if (row_len % V != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (int64_t s : strides)
    if (s % V != 0) return false;
  return true;
}

// Calls f(std::integral_constant<int, V>{}) with V = kVec16<T> when `vec` is true, else V = 1.
template <typename T, typename F>
inline cudaError_t with_vec(bool vec, F&& f) {
  return vec ? f(std::integral_constant<int, kVec16<T>>{}) : f(std::integral_constant<int, 1>{});
}

// ---- reductions -------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums `a` and `b` over the block (blockDim.x a multiple of 32, blockDim.y == 1) in a fixed order;
// every thread gets the totals. `red` holds >= 64 elements and must not be written again before
// the next __syncthreads (use another buffer for the next reduction).
template <typename A>
__device__ __forceinline__ void block_sum2(A& a, A& b, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    red[warp] = a;
    red[32 + warp] = b;
  }
  __syncthreads();
  A ta = A(0), tb = A(0);
  for (int w = 0; w < nwarps; ++w) {
    ta += red[w];
    tb += red[32 + w];
  }
  a = ta;
  b = tb;
}

// One sum; `red` holds >= 32 elements, with block_sum2's rule on reuse.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  A t = A(0);
  for (int w = 0; w < nwarps; ++w) t += red[w];
  return t;
}

// ---- launch geometry --------------------------------------------------------------------------

constexpr int64_t kMaxGrid = int64_t(1) << 30;

inline unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(items < 1 ? 1 : (items < kMaxGrid ? items : kMaxGrid));
}

// Row kernels (one block per row): each thread keeps up to kRowSlots vectors of its row in
// registers, so the row is read from global memory once.
constexpr int kRowSlots = 4;

// Threads for a row of `vecs` vectors: enough for kRowSlots vectors per thread, a multiple of 32,
// at most 1024. Rows longer than 1024 * kRowSlots vectors are re-read instead of held.
inline int row_threads(int64_t vecs) {
  const int64_t t = (vecs + kRowSlots - 1) / kRowSlots;
  const int64_t w = (t + 31) / 32 * 32;
  return static_cast<int>(w < 32 ? 32 : (w > 1024 ? 1024 : w));
}

inline bool row_fits(int64_t vecs, int threads) {
  return vecs <= static_cast<int64_t>(threads) * kRowSlots;
}

// Calls f(k, j) for the vectors j of this thread's share of a row of `vecs` vectors: slot k =
// 0..kRowSlots-1 holds vector threadIdx.x + k * blockDim.x when kCached (the caller's register
// arrays are indexed by k; the loop is unrolled), else every vector threadIdx.x + i * blockDim.x
// with k = 0.
template <bool kCached, typename F>
__device__ __forceinline__ void for_row_vecs(int64_t vecs, F&& f) {
  if (kCached) {
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < vecs) f(k, j);
    }
  } else {
    for (int64_t j = threadIdx.x; j < vecs; j += blockDim.x) f(0, j);
  }
}

// Element-wise kernels over (rows, vecs) with per-column parameters: block (x, y) covers
// `x` vectors of `y` rows; the grid's x tiles split a row into equal parts of <= 256 vectors, and
// its row tiles stop at ~kTargetBlocks blocks in all (then each thread loops over several rows,
// reusing the parameters it loaded). No index division anywhere.
constexpr int64_t kTargetBlocks = 4096;

struct ElemGeometry {
  dim3 block;
  unsigned tiles_x;
  unsigned row_tiles;
};

// `other_blocks`: blocks along the grid's remaining axis (e.g. the batch).
inline ElemGeometry elem_geometry(int64_t rows, int64_t vecs, int64_t other_blocks = 1) {
  const int64_t tiles_x = (vecs + 255) / 256;
  const int64_t bx = tiles_x > 0 ? (vecs + tiles_x - 1) / tiles_x : 1;
  const int64_t by = bx >= 256 ? 1 : 256 / bx;
  int64_t ty = (rows + by - 1) / by;
  const int64_t cap = kTargetBlocks / (tiles_x * other_blocks);
  if (ty > cap) ty = cap;
  if (ty > 65535) ty = 65535;
  if (ty < 1) ty = 1;
  return {dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)),
          static_cast<unsigned>(tiles_x < 1 ? 1 : tiles_x), static_cast<unsigned>(ty)};
}

// Column-sum kernels: block (kColTile vectors, kRowLanes rows); the lanes' partial sums are added
// in a fixed order.
constexpr int kColTile = 32;
constexpr int kRowLanes = 8;

}  // namespace elem
}  // namespace cuda
}  // namespace dit_fast
