// CUDA kernels of the patch embedding (one GEMM over patches, conv bias + pos_embed in the
// epilogue), its backward and unpatchify. Torch-free: raw pointers + stream. Index math shared with
// the CPU kernels through csrc/common/patchify.h.
//
// GEMM: one tiled kernel (64 x 64 output tile per 256-thread block, 4 x 4 per thread, K steps of
// 16 staged in shared memory, accumulation in fp32 / fp64) instantiated with operand loaders and
// epilogues:
//   forward  out[M, D] = P[M, K] @ W^T      A = patches gathered from x, epilogue + bias + pos
//   dx       dP[M, K]  = dout[M, D] @ W     epilogue scatters into dx (N, C, H, W)
//   dweight  dW[D, K]  = dout^T @ P         split over M into fixed chunks (partial sums in a
//                                           workspace, summed in chunk order by a second kernel)
//   dbias    column sums of dout            one block per 32 columns, fixed order
// All reductions have a fixed order: results are deterministic run to run.
//
// Compiles alone with:
//   nvcc -std=c++17 -I csrc -gencode=arch=compute_80,code=sm_80
//        -gencode=arch=compute_90a,code=sm_90a -c csrc/cuda/patchify.cu   (one line)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/patchify.h"
#include "cuda/embed_cuda.h"
#include "cuda/embed_io.cuh"

namespace dit_fast {
namespace cuda {
namespace {

namespace pf = ::dit_fast::patchify;
using embed::Io;

constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

struct Geo {
  int64_t N, C, H, W, p, D, Wg, T, K, M;
};

__host__ Geo make_geo(int64_t N, int64_t C, int64_t H, int64_t W, int64_t p, int64_t D) {
  const int64_t Hg = H / p, Wg = W / p;
  return Geo{N, C, H, W, p, D, Wg, Hg * Wg, C * p * p, N * Hg * Wg};
}

__device__ __forceinline__ int64_t patch_off(const Geo& g, int64_t m, int64_t k) {
  const int64_t n = m / g.T;
  return pf::patch_src_offset(n, m - n * g.T, k, g.C, g.H, g.W, g.p, g.Wg);
}

// C[r, c] = sum_{q in split} A(r, q) * B(q, c); rows over grid.x, columns over grid.y, reduction
// splits over grid.z (q in [z * q_per_split, (z + 1) * q_per_split)). kAqFast / kBqFast: whether
// consecutive threads load consecutive q (else consecutive r / c) when staging the tiles, to
// follow the operands' contiguous dimension.
template <typename Acc, bool kAqFast, bool kBqFast, class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(int64_t M, int64_t Ncol, int64_t Q, int64_t q_per_split, LoadA la, LoadB lb,
                Store st) {
  __shared__ Acc As[kBK][kBM];
  __shared__ Acc Bs[kBK][kBN];
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t qb = static_cast<int64_t>(blockIdx.z) * q_per_split;
  const int64_t qe = qb + q_per_split < Q ? qb + q_per_split : Q;
  const int tr = tid / (kBN / kTN), tc = tid % (kBN / kTN);
  Acc acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = Acc(0);

  for (int64_t q0 = qb; q0 < qe; q0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += kThreads) {
      const int r = kAqFast ? e / kBK : e % kBM;
      const int q = kAqFast ? e % kBK : e / kBM;
      const int64_t gr = row0 + r, gq = q0 + q;
      As[q][r] = (gr < M && gq < qe) ? la(gr, gq) : Acc(0);
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int c = kBqFast ? e / kBK : e % kBN;
      const int q = kBqFast ? e % kBK : e / kBN;
      const int64_t gc = col0 + c, gq = q0 + q;
      Bs[q][c] = (gc < Ncol && gq < qe) ? lb(gq, gc) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kBK; ++q) {
      Acc a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = As[q][tr * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = Bs[q][tc * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t gr = row0 + tr * kTM + i;
    if (gr >= M) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t gc = col0 + tc * kTN + j;
      if (gc < Ncol) st(gr, gc, acc[i][j], blockIdx.z);
    }
  }
}

// ---- operand loaders and epilogues -----------------------------------------------------------

template <typename T>
struct PatchA {  // A(m, k) = P[m, k] (forward) / B(m, k) (dweight)
  const T* x;
  Geo g;
  __device__ typename Io<T>::A operator()(int64_t m, int64_t k) const {
    return Io<T>::load(x + patch_off(g, m, k));
  }
};
template <typename T>
struct WeightT {  // B(k, d) = W[d, k]
  const T* w;
  int64_t K;
  __device__ typename Io<T>::A operator()(int64_t k, int64_t d) const {
    return Io<T>::load(w + d * K + k);
  }
};
template <typename T>
struct Weight {  // B(d, k) = W[d, k]
  const T* w;
  int64_t K;
  __device__ typename Io<T>::A operator()(int64_t d, int64_t k) const {
    return Io<T>::load(w + d * K + k);
  }
};
template <typename T>
struct RowMajor {  // A(m, d) = dout[m, d]
  const T* p;
  int64_t ld;
  __device__ typename Io<T>::A operator()(int64_t r, int64_t c) const {
    return Io<T>::load(p + r * ld + c);
  }
};
template <typename T>
struct Transposed {  // A(d, m) = dout[m, d]
  const T* p;
  int64_t ld;
  __device__ typename Io<T>::A operator()(int64_t r, int64_t c) const {
    return Io<T>::load(p + c * ld + r);
  }
};

template <typename T>
struct FwdStore {
  T* out;
  const T* bias;
  const T* pos;
  int64_t D, T_;
  __device__ void operator()(int64_t m, int64_t d, typename Io<T>::A acc, unsigned) const {
    using A = typename Io<T>::A;
    const A b = bias ? Io<T>::load(bias + d) : A(0);
    const A pv = pos ? Io<T>::load(pos + (m % T_) * D + d) : A(0);
    Io<T>::store(out + m * D + d, pf::epilogue<A>(acc, b, pv));
  }
};
template <typename T>
struct DxStore {
  T* dx;
  Geo g;
  __device__ void operator()(int64_t m, int64_t k, typename Io<T>::A acc, unsigned) const {
    Io<T>::store(dx + patch_off(g, m, k), acc);
  }
};
template <typename T>
struct DwStore {  // splits == 1: dw[d, k]; else partial[z, d, k] in the accumulator type
  T* dw;
  typename Io<T>::A* partial;
  int64_t D, K;
  __device__ void operator()(int64_t d, int64_t k, typename Io<T>::A acc, unsigned z) const {
    if (partial != nullptr) {
      partial[(static_cast<int64_t>(z) * D + d) * K + k] = acc;
    } else {
      Io<T>::store(dw + d * K + k, acc);
    }
  }
};

template <typename T>
__global__ void dw_reduce_kernel(const typename Io<T>::A* __restrict__ partial, T* __restrict__ dw,
                                 int64_t DK, int splits) {
  using A = typename Io<T>::A;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < DK;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int z = 0; z < splits; ++z) s += partial[z * DK + i];
    Io<T>::store(dw + i, s);
  }
}

constexpr int kColTile = 32, kRowLanes = 8;

// grid: ceil(D / 32); block: (32, 8). Column sums of dout (M, D), fixed order.
template <typename T>
__global__ void dbias_kernel(const T* __restrict__ dout, T* __restrict__ db, int64_t M, int64_t D) {
  using A = typename Io<T>::A;
  __shared__ A part[kRowLanes][kColTile + 1];
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  A s = A(0);
  if (d < D)
    for (int64_t m = threadIdx.y; m < M; m += kRowLanes) s += Io<T>::load(dout + m * D + d);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    A t = A(0);
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) t += part[i][threadIdx.x];
    Io<T>::store(db + d, t);
  }
}

// ---- launchers ------------------------------------------------------------------------------

constexpr int64_t kMaxGridYZ = 65535;

inline dim3 gemm_grid(int64_t rows, int64_t cols, int64_t splits) {
  return dim3(static_cast<unsigned>((rows + kBM - 1) / kBM),
              static_cast<unsigned>((cols + kBN - 1) / kBN), static_cast<unsigned>(splits));
}

// Split of the dweight reduction over M: enough blocks to fill a GPU, chunks of >= 2048 rows.
inline int64_t dw_splits(const Geo& g) {
  const int64_t tiles = ((g.D + kBM - 1) / kBM) * ((g.K + kBN - 1) / kBN);
  int64_t s = (g.M + 2047) / 2048;
  const int64_t want = (256 + tiles - 1) / tiles;
  if (s > want) s = want;
  if (s > 64) s = 64;
  return s < 1 ? 1 : s;
}

template <typename T>
cudaError_t launch_fwd(const Geo& g, const void* x, const void* w, const void* bias,
                       const void* pos, void* out, cudaStream_t stream) {
  using A = typename Io<T>::A;
  if ((g.D + kBN - 1) / kBN > kMaxGridYZ) return cudaErrorInvalidValue;
  gemm_kernel<A, true, true><<<gemm_grid(g.M, g.D, 1), kThreads, 0, stream>>>(
      g.M, g.D, g.K, g.K, PatchA<T>{static_cast<const T*>(x), g},
      WeightT<T>{static_cast<const T*>(w), g.K},
      FwdStore<T>{static_cast<T*>(out), static_cast<const T*>(bias), static_cast<const T*>(pos),
                  g.D, g.T});
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const Geo& g, const void* dout, const void* x, const void* w, void* dx,
                       void* dw, void* db, void* workspace, cudaStream_t stream) {
  using A = typename Io<T>::A;
  const T* go = static_cast<const T*>(dout);
  if (dx != nullptr) {
    if ((g.K + kBN - 1) / kBN > kMaxGridYZ) return cudaErrorInvalidValue;
    gemm_kernel<A, true, false><<<gemm_grid(g.M, g.K, 1), kThreads, 0, stream>>>(
        g.M, g.K, g.D, g.D, RowMajor<T>{go, g.D}, Weight<T>{static_cast<const T*>(w), g.K},
        DxStore<T>{static_cast<T*>(dx), g});
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (dw != nullptr) {
    if ((g.K + kBN - 1) / kBN > kMaxGridYZ) return cudaErrorInvalidValue;
    const int64_t splits = dw_splits(g);
    const int64_t per = ((g.M + splits - 1) / splits + kBK - 1) / kBK * kBK;
    A* partial = splits > 1 ? static_cast<A*>(workspace) : nullptr;
    if (splits > 1 && partial == nullptr) return cudaErrorInvalidValue;
    gemm_kernel<A, false, false><<<gemm_grid(g.D, g.K, splits), kThreads, 0, stream>>>(
        g.D, g.K, g.M, per, Transposed<T>{go, g.D}, PatchA<T>{static_cast<const T*>(x), g},
        DwStore<T>{static_cast<T*>(dw), partial, g.D, g.K});
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (splits > 1) {
      const int64_t DK = g.D * g.K;
      dw_reduce_kernel<T><<<embed::grid_for(DK, 256), 256, 0, stream>>>(
          partial, static_cast<T*>(dw), DK, static_cast<int>(splits));
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
  }
  if (db != nullptr) {
    dbias_kernel<T><<<static_cast<unsigned>((g.D + kColTile - 1) / kColTile),
                      dim3(kColTile, kRowLanes), 0, stream>>>(go, static_cast<T*>(db), g.M, g.D);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename E>
__global__ void unpatchify_kernel(const E* __restrict__ src, E* __restrict__ dst, int64_t total,
                                  int64_t C, int64_t Hg, int64_t Wg, int64_t p, bool forward) {
  const int64_t Hd = Hg * p, Wd = Wg * p, T = Hg * Wg, ppc = p * p * C;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t s;
    if (forward) {  // o indexes img (N, C, Hd, Wd)
      const int64_t w = o % Wd;
      int64_t r = o / Wd;
      const int64_t h = r % Hd;
      r /= Hd;
      const int64_t c = r % C, n = r / C;
      s = pf::unpatchify_src_offset(n, c, h, w, C, p, Wg, T);
    } else {  // o indexes dy (N, T, p*p*C)
      const int64_t e = o % ppc;
      const int64_t r = o / ppc;
      const int64_t t = r % T, n = r / T;
      const int64_t c = e % C, ij = e / C;
      const int64_t i = ij / p, j = ij - i * p;
      const int64_t gh = t / Wg, gw = t - gh * Wg;
      s = ((n * C + c) * Hd + gh * p + i) * Wd + gw * p + j;
    }
    dst[o] = src[s];
  }
}

template <typename E>
cudaError_t launch_unpatchify(const void* src, void* dst, int64_t N, int64_t C, int64_t Hg,
                              int64_t Wg, int64_t p, bool forward, cudaStream_t stream) {
  const int64_t total = N * C * Hg * Wg * p * p;
  if (total == 0) return cudaSuccess;
  unpatchify_kernel<E><<<embed::grid_for(total, 256), 256, 0, stream>>>(
      static_cast<const E*>(src), static_cast<E*>(dst), total, C, Hg, Wg, p, forward);
  return cudaGetLastError();
}

cudaError_t unpatchify_any(int elem_size, const void* src, void* dst, int64_t N, int64_t C,
                           int64_t Hg, int64_t Wg, int64_t p, bool forward, cudaStream_t stream) {
  if (N < 0 || C < 0 || Hg < 0 || Wg < 0 || p <= 0) return cudaErrorInvalidValue;
  switch (elem_size) {
    case 2: return launch_unpatchify<uint16_t>(src, dst, N, C, Hg, Wg, p, forward, stream);
    case 4: return launch_unpatchify<uint32_t>(src, dst, N, C, Hg, Wg, p, forward, stream);
    case 8: return launch_unpatchify<uint64_t>(src, dst, N, C, Hg, Wg, p, forward, stream);
    default: return cudaErrorNotSupported;
  }
}

bool valid(int64_t N, int64_t C, int64_t H, int64_t W, int64_t p, int64_t D) {
  return N >= 0 && C >= 0 && H >= 0 && W >= 0 && p > 0 && D >= 0 && H % p == 0 && W % p == 0;
}

size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace

cudaError_t patch_embed_fwd(DType dtype, const void* x, const void* weight, const void* bias,
                            const void* pos, void* out, int64_t N, int64_t C, int64_t H, int64_t W,
                            int64_t p, int64_t D, cudaStream_t stream) {
  if (!valid(N, C, H, W, p, D)) return cudaErrorInvalidValue;
  const Geo g = make_geo(N, C, H, W, p, D);
  if (g.M * D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(g, x, weight, bias, pos, out, stream);
    case DType::kFloat64: return launch_fwd<double>(g, x, weight, bias, pos, out, stream);
    case DType::kFloat16: return launch_fwd<__half>(g, x, weight, bias, pos, out, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(g, x, weight, bias, pos, out, stream);
  }
  return cudaErrorNotSupported;
}

size_t patch_embed_bwd_workspace_bytes(DType dtype, int64_t N, int64_t C, int64_t H, int64_t W,
                                       int64_t p, int64_t D) {
  if (!valid(N, C, H, W, p, D)) return 0;
  const Geo g = make_geo(N, C, H, W, p, D);
  if (g.M == 0 || D == 0 || g.K == 0) return 0;
  const int64_t splits = dw_splits(g);
  return splits > 1 ? static_cast<size_t>(splits * D * g.K) * acc_size(dtype) : 0;
}

cudaError_t patch_embed_bwd(DType dtype, const void* dout, const void* x, const void* weight,
                            void* dx, void* dweight, void* dbias, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t p, int64_t D, void* workspace,
                            cudaStream_t stream) {
  if (!valid(N, C, H, W, p, D)) return cudaErrorInvalidValue;
  const Geo g = make_geo(N, C, H, W, p, D);
  const size_t es = dtype == DType::kFloat64 ? 8 : (dtype == DType::kFloat32 ? 4 : 2);
  if (g.M == 0 || D == 0 || g.K == 0) {  // empty sums: zero whatever was requested
    cudaError_t e = cudaSuccess;
    if (dx && e == cudaSuccess) e = cudaMemsetAsync(dx, 0, static_cast<size_t>(N * C * H * W) * es, stream);
    if (dweight && e == cudaSuccess) e = cudaMemsetAsync(dweight, 0, static_cast<size_t>(D * g.K) * es, stream);
    if (dbias && e == cudaSuccess) e = cudaMemsetAsync(dbias, 0, static_cast<size_t>(D) * es, stream);
    return e;
  }
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(g, dout, x, weight, dx, dweight, dbias, workspace, stream);
    case DType::kFloat64:
      return launch_bwd<double>(g, dout, x, weight, dx, dweight, dbias, workspace, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(g, dout, x, weight, dx, dweight, dbias, workspace, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(g, dout, x, weight, dx, dweight, dbias, workspace, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t unpatchify_fwd(int elem_size, const void* y, void* img, int64_t N, int64_t Co,
                           int64_t Hg, int64_t Wg, int64_t p, cudaStream_t stream) {
  return unpatchify_any(elem_size, y, img, N, Co, Hg, Wg, p, true, stream);
}

cudaError_t unpatchify_bwd(int elem_size, const void* dimg, void* dy, int64_t N, int64_t Co,
                           int64_t Hg, int64_t Wg, int64_t p, cudaStream_t stream) {
  return unpatchify_any(elem_size, dimg, dy, N, Co, Hg, Wg, p, false, stream);
}

}  // namespace cuda
}  // namespace dit_fast
