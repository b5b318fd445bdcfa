// Row routines of the LayerNorm-modulate shared by the CPU kernels that end (forward) or start
// (backward) with it: ln_modulate.cpp and the fused gated-residual kernel in gated_residual.cpp.
// Math from common/ln_modulate.h; force-inlined into each kernel's ISA clones. Internal to csrc/cpu.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/ln_modulate.h"
#include "common/macros.h"
#include "cpu/row_parallel.h"

namespace dit_fast {
namespace cpu {
namespace lnm_rows {

// out = LN(r) * (1 + sc) + sh for one row of D accumulator-type elements `r` (T: A itself, or
// bf16 with A = float); stores the row's mean and rstd.
template <typename T, typename A>
DIT_FORCEINLINE void forward(const A* r, const A* sh, const A* sc, int64_t D, A eps, T* out,
                             A* mean_out, A* rstd_out) {
  namespace lnm = ::dit_fast::ln_modulate;
  A mean, var;
  lnm::row_mean_var<A>(r, D, mean, var);
  const A rstd = lnm::rstd_from_var<A>(var, eps);
  *mean_out = mean;
  *rstd_out = rstd;
  if constexpr (std::is_same<T, A>::value) {
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d) out[d] = lnm::forward_elem<A>(r[d], mean, rstd, sh[d], sc[d]);
  } else {  // rounded in the same pass (one pass less than a float row + store_row)
    DIT_OMP_SIMD
    for (int64_t d = 0; d < D; ++d)
      out[d].bits = float_to_bf16_bits(lnm::forward_elem<A>(r[d], mean, rstd, sh[d], sc[d]));
  }
}

// The backward's first pass over one row: acc_dshift += dy, acc_dscale += dy * xhat, and the two
// row means that grad_x needs: mean_g = mean(g), mean_gx = mean(g * xhat), g = dy * (1 + sc).
template <typename A>
DIT_FORCEINLINE void backward_sums(const A* r, const A* dy, const A* sc, A mean, A rstd, int64_t D,
                                   A* acc_dshift, A* acc_dscale, A& mean_g, A& mean_gx) {
  namespace lnm = ::dit_fast::ln_modulate;
  A sum_g = A(0), sum_gx = A(0);
  DIT_OMP_SIMD_SUM(sum_g, sum_gx)
  for (int64_t d = 0; d < D; ++d) {
    const A xh = lnm::normalize<A>(r[d], mean, rstd);
    const A g = lnm::grad_xhat<A>(dy[d], sc[d]);
    sum_g += g;
    sum_gx += g * xh;
    acc_dshift[d] += dy[d];
    acc_dscale[d] += dy[d] * xh;
  }
  const A inv_d = D > 0 ? A(1) / static_cast<A>(D) : A(0);
  mean_g = sum_g * inv_d;
  mean_gx = sum_gx * inv_d;
}

}  // namespace lnm_rows
}  // namespace cpu
}  // namespace dit_fast
