// Row and column pieces of the LayerNorm-modulate shared by the CUDA kernels that end (forward) or
// start (backward) with it: ln_modulate.cu and the fused gated residual in gated_residual.cu (the
// CUDA counterpart of csrc/cpu/ln_modulate_rows.h). Math from common/ln_modulate.h.
//
// Row pieces run in a row kernel (one block per row, elem::row_threads threads): each thread holds
// its vectors of the row in registers (`Row`, slots as elem::for_row_vecs) when kCached, else
// re-reads them from `src`.
#pragma once

#include <cstdint>

#include "common/ln_modulate.h"
#include "cuda/elem_common.cuh"

namespace dit_fast {
namespace cuda {
namespace ln_rows {

using elem::Io;

template <typename A, int V, bool kCached>
struct Row {
  A v[kCached ? elem::kRowSlots : 1][V];
};

// mean and rstd of a row whose thread-local sum of elements is `s` (the row itself: `row`, or
// `src` when not cached), by the corrected two-pass rule of common/ln_modulate.h. Two block
// reductions (red_a: >= 32, red_b: >= 64 elements; reusable after the next __syncthreads).
template <typename T, int V, bool kCached>
__device__ __forceinline__ void stats(const Row<typename Io<T>::A, V, kCached>& row, const T* src,
                                      typename Io<T>::A s, int64_t vecs, int64_t D,
                                      typename Io<T>::A eps, typename Io<T>::A* red_a,
                                      typename Io<T>::A* red_b, typename Io<T>::A& mean,
                                      typename Io<T>::A& rstd) {
  namespace lnm = ::dit_fast::ln_modulate;
  using A = typename Io<T>::A;
  const A m = D > 0 ? elem::block_sum(s, red_a) / static_cast<A>(D) : A(0);
  A sum_c = A(0), sum_c2 = A(0);
  elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
    A v[V];
    if (kCached) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = row.v[k][i];
    } else {
      elem::load_vec<T, V>(src + j * V, v);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A c = v[i] - m;
      sum_c += c;
      sum_c2 += c * c;
    }
  });
  elem::block_sum2(sum_c, sum_c2, red_b);
  A var = A(0);
  mean = A(0);
  if (D > 0) lnm::finish_mean_var<A>(m, sum_c, sum_c2, D, mean, var);
  rstd = lnm::rstd_from_var<A>(var, eps);
}

// out = LN(row) * (1 + scale) + shift for the row (`row` / `src` as in stats).
template <typename T, int V, bool kCached>
__device__ __forceinline__ void modulate(const Row<typename Io<T>::A, V, kCached>& row,
                                         const T* src, const T* __restrict__ shift,
                                         const T* __restrict__ scale, T* out, int64_t vecs,
                                         typename Io<T>::A mean, typename Io<T>::A rstd) {
  namespace lnm = ::dit_fast::ln_modulate;
  using A = typename Io<T>::A;
  elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
    A v[V], sh[V], sc[V];
    if (kCached) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = row.v[k][i];
    } else {
      elem::load_vec<T, V>(src + j * V, v);
    }
    elem::load_vec<T, V>(shift + j * V, sh);
    elem::load_vec<T, V>(scale + j * V, sc);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = lnm::forward_elem<A>(v[i], mean, rstd, sh[i], sc[i]);
    elem::store_vec<T, V>(out + j * V, v);
  });
}

// The forward kernels' common tail for one row whose thread-local element sum is `s` (`row` /
// `src` as in stats): mean and rstd (stored by thread 0), then out = LN(row) * (1 + scale) + shift.
template <typename T, int V, bool kCached>
__device__ __forceinline__ void forward(const Row<typename Io<T>::A, V, kCached>& row, const T* src,
                                        typename Io<T>::A s, int64_t vecs, int64_t D,
                                        typename Io<T>::A eps, const T* __restrict__ shift,
                                        const T* __restrict__ scale, T* out,
                                        typename Io<T>::A* mean_out, typename Io<T>::A* rstd_out,
                                        typename Io<T>::A* red_a, typename Io<T>::A* red_b) {
  typename Io<T>::A mean, rstd;
  stats<T, V, kCached>(row, src, s, vecs, D, eps, red_a, red_b, mean, rstd);
  if (threadIdx.x == 0) {
    *mean_out = mean;
    *rstd_out = rstd;
  }
  modulate<T, V, kCached>(row, src, shift, scale, out, vecs, mean, rstd);
}

// The backward's first pass over a row: xhat and g = dy * (1 + scale) (held in xh / g when
// kCached) and the row means mean_g = mean(g), mean_gx = mean(g * xhat). One block reduction
// (red: >= 64 elements).
template <typename T, int V, bool kCached>
__device__ __forceinline__ void bwd_sums(const T* x, const T* dy, const T* __restrict__ scale,
                                         typename Io<T>::A mean, typename Io<T>::A rstd,
                                         int64_t vecs, int64_t D,
                                         Row<typename Io<T>::A, V, kCached>& xh,
                                         Row<typename Io<T>::A, V, kCached>& g,
                                         typename Io<T>::A* red, typename Io<T>::A& mean_g,
                                         typename Io<T>::A& mean_gx) {
  namespace lnm = ::dit_fast::ln_modulate;
  using A = typename Io<T>::A;
  A sg = A(0), sgx = A(0);
  elem::for_row_vecs<kCached>(vecs, [&](int k, int64_t j) {
    A xv[V], dv[V], sc[V];
    elem::load_vec<T, V>(x + j * V, xv);
    elem::load_vec<T, V>(dy + j * V, dv);
    elem::load_vec<T, V>(scale + j * V, sc);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const A xhi = lnm::normalize<A>(xv[i], mean, rstd);
      const A gi = lnm::grad_xhat<A>(dv[i], sc[i]);
      sg += gi;
      sgx += gi * xhi;
      if (kCached) {
        xh.v[k][i] = xhi;
        g.v[k][i] = gi;
      }
    }
  });
  elem::block_sum2(sg, sgx, red);
  const A inv_d = A(1) / static_cast<A>(D);
  mean_g = sg * inv_d;
  mean_gx = sgx * inv_d;
}

// xhat and g of vector j (slot k), from the cache or recomputed as in bwd_sums.
template <typename T, int V, bool kCached>
__device__ __forceinline__ void bwd_elems(const T* x, const T* dy, const T* __restrict__ scale,
                                          typename Io<T>::A mean, typename Io<T>::A rstd,
                                          const Row<typename Io<T>::A, V, kCached>& xh_row,
                                          const Row<typename Io<T>::A, V, kCached>& g_row, int k,
                                          int64_t j, typename Io<T>::A (&xh)[V],
                                          typename Io<T>::A (&g)[V]) {
  namespace lnm = ::dit_fast::ln_modulate;
  using A = typename Io<T>::A;
  if (kCached) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      xh[i] = xh_row.v[k][i];
      g[i] = g_row.v[k][i];
    }
  } else {
    A sc[V];
    elem::load_vec<T, V>(x + j * V, xh);
    elem::load_vec<T, V>(dy + j * V, g);
    elem::load_vec<T, V>(scale + j * V, sc);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      xh[i] = lnm::normalize<A>(xh[i], mean, rstd);
      g[i] = lnm::grad_xhat<A>(g[i], sc[i]);
    }
  }
}

// Parameter gradients as column sums over the tokens of each batch entry, in a fixed order:
//   dshift = sum_T dh,  dscale = sum_T dh * xhat  and, when kGate, dgate = sum_T dx * y.
// grid: (ceil(D / V / 32), N); block: (32, 8).
template <typename T, int V, bool kGate>
__global__ void dparams_kernel(const T* __restrict__ dh, const T* __restrict__ x,
                               const typename Io<T>::A* __restrict__ mean,
                               const typename Io<T>::A* __restrict__ rstd,
                               const T* __restrict__ dx, const T* __restrict__ y,
                               T* __restrict__ dgate, T* __restrict__ dshift,
                               T* __restrict__ dscale, int64_t Tn, int64_t D) {
  namespace lnm = ::dit_fast::ln_modulate;
  using A = typename Io<T>::A;
  constexpr int kSums = kGate ? 3 : 2;
  __shared__ A s_acc[kSums][elem::kRowLanes][V][elem::kColTile + 1];
  const int64_t n = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * elem::kColTile + threadIdx.x) * V;
  A acc[kSums][V];
#pragma unroll
  for (int s = 0; s < kSums; ++s)
#pragma unroll
    for (int i = 0; i < V; ++i) acc[s][i] = A(0);
  if (c < D) {
    for (int64_t t = threadIdx.y; t < Tn; t += elem::kRowLanes) {
      const int64_t row = n * Tn + t, off = row * D + c;
      const A m = mean[row], rs = rstd[row];
      A g[V], xv[V];
      elem::load_vec<T, V>(dh + off, g);
      elem::load_vec<T, V>(x + off, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        acc[0][i] += g[i];
        acc[1][i] += g[i] * lnm::normalize<A>(xv[i], m, rs);
      }
      if constexpr (kGate) {
        A dv[V], yv[V];
        elem::load_vec<T, V>(dx + off, dv);
        elem::load_vec<T, V>(y + off, yv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[kSums - 1][i] += dv[i] * yv[i];
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSums; ++s)
#pragma unroll
    for (int i = 0; i < V; ++i) s_acc[s][threadIdx.y][i][threadIdx.x] = acc[s][i];
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    T* outs[3] = {dshift, dscale, dgate};
#pragma unroll
    for (int s = 0; s < kSums; ++s) {
      A tot[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        tot[i] = A(0);
#pragma unroll
        for (int l = 0; l < elem::kRowLanes; ++l) tot[i] += s_acc[s][l][i][threadIdx.x];
      }
      elem::store_vec<T, V>(outs[s] + n * D + c, tot);
    }
  }
}

}  // namespace ln_rows
}  // namespace cuda
}  // namespace dit_fast
