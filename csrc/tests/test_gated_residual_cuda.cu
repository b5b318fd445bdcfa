// CUDA gated-residual kernels (fused with LayerNorm-modulate, and plain) vs the CPU kernels (tested
// against a double-precision reference in test_gated_residual_cpu.cpp). Exits 77 (ctest: skipped)
// when no GPU is visible. fp32 / fp64 / bf16 compare with the CPU kernel on identical inputs; fp16
// compares with the CPU fp32 kernel run on the fp16-rounded inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cpu/gated_residual.h"
#include "cuda/gated_residual_cuda.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using namespace cuda_test;

template <typename S, typename H = Host<S>, typename C = typename H::C, typename A = typename H::A>
void run_case(const int64_t (&shape)[4]) {
  const double tol = per_host<S>(2e-5, 1e-12, 1.0 / 64, 4e-3);
  const DType dt = H::dt, cpu_dt = H::cpu_dt;
  const int64_t N = shape[0], T = shape[1], D = shape[2], rs_mult = shape[3];
  std::mt19937 rng(static_cast<uint32_t>(N * 131 + T * 7 + D));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = N * T, prs = std::max<int64_t>(rs_mult * D, 3 * D);
  std::vector<S> x(rows * D), y(rows * D), dh(rows * D), dxn(rows * D), par(std::max<int64_t>(N, 1) * prs);
  for (int64_t r = 0; r < rows; ++r) {
    const float off = nd(rng), sc = std::exp(0.5f * nd(rng));
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = H::from(off + sc * nd(rng));
  }
  for (auto* v : {&y, &dh, &dxn})
    for (auto& e : *v) e = H::from(nd(rng));
  for (auto& v : par) v = H::from(0.5f * nd(rng));
  std::vector<C> cx = cpu_copy(x), cy = cpu_copy(y), cdh = cpu_copy(dh), cdxn = cpu_copy(dxn),
                 cpar = cpu_copy(par);
  std::vector<C> rxn(rows * D), rh(rows * D), rdx(rows * D), rdy(rows * D), rdg(N * D), rds(N * D),
      rdc(N * D), rout(rows * D), rpdy(rows * D), rpdg(N * D);
  std::vector<A> rm(rows), rr(rows);
  cpu::gated_residual_ln_modulate_fwd(cpu_dt, cx.data(), cy.data(), cpar.data(), prs,
                                      cpar.data() + D, prs, cpar.data() + 2 * D, prs, rxn.data(),
                                      rh.data(), rm.data(), rr.data(), N, T, D, 1e-6);
  cpu::gated_residual_ln_modulate_bwd(cpu_dt, cdxn.data(), cdh.data(), rxn.data(), cy.data(),
                                      cpar.data(), prs, cpar.data() + 2 * D, prs, rm.data(),
                                      rr.data(), rdx.data(), rdy.data(), rdg.data(), rds.data(),
                                      rdc.data(), N, T, D);
  cpu::gated_residual_fwd(cpu_dt, cx.data(), cy.data(), cpar.data(), prs, rout.data(), N, T, D);
  cpu::gated_residual_bwd(cpu_dt, cdh.data(), cy.data(), cpar.data(), prs, rpdy.data(), rpdg.data(),
                          N, T, D);

  Dev<S> gx(x.size()), gy(y.size()), gdh(dh.size()), gdxn(dxn.size()), gpar(par.size()),
      gxn(rows * D), gh(rows * D), gdx(rows * D), gdy(rows * D), gdg(N * D), gds(N * D),
      gdc(N * D), gout(rows * D), gpdy(rows * D), gpdg(N * D);
  Dev<A> gm(rows), gr(rows);
  gx.put(x), gy.put(y), gdh.put(dh), gdxn.put(dxn), gpar.put(par);
  CUDA_OK(cuda::gated_residual_ln_modulate_fwd(dt, gx.p, gy.p, gpar.p, prs, gpar.p + D, prs,
                                               gpar.p + 2 * D, prs, gxn.p, gh.p, gm.p, gr.p, N, T,
                                               D, 1e-6, nullptr));
  CUDA_OK(cuda::gated_residual_ln_modulate_bwd(dt, gdxn.p, gdh.p, gxn.p, gy.p, gpar.p, prs,
                                               gpar.p + 2 * D, prs, gm.p, gr.p, gdx.p, gdy.p,
                                               gdg.p, gds.p, gdc.p, N, T, D, nullptr));
  CUDA_OK(cuda::gated_residual_fwd(dt, gx.p, gy.p, gpar.p, prs, gout.p, N, T, D, nullptr));
  CUDA_OK(cuda::gated_residual_bwd(dt, gdh.p, gy.p, gpar.p, prs, gpdy.p, gpdg.p, N, T, D, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  expect_within(
      format("%s N=%lld T=%lld D=%lld", dtype_name(dt), (long long)N, (long long)T,
                        (long long)D),
      tol, {{"x_new", max_rel(gxn.get(), rxn)}, {"h", max_rel(gh.get(), rh)},
            {"mean", max_rel(gm.get(), rm)}, {"rstd", max_rel(gr.get(), rr)},
            {"dx", max_rel(gdx.get(), rdx)}, {"dy", max_rel(gdy.get(), rdy)},
            {"dgate", max_rel(gdg.get(), rdg)}, {"dshift", max_rel(gds.get(), rds)},
            {"dscale", max_rel(gdc.get(), rdc)}, {"plain out", max_rel(gout.get(), rout)},
            {"plain dy", max_rel(gpdy.get(), rpdy)}, {"plain dgate", max_rel(gpdg.get(), rpdg)}});
}

int main() {
  if (!have_gpu("test_gated_residual_cuda")) return 77;
  const int64_t shapes[][4] = {{1, 1, 72, 3},   {3, 7, 72, 6}, {1, 257, 1152, 6}, {3, 7, 1000, 3},
                               {2, 3, 1, 3},    {2, 0, 16, 3}, {1, 2, 20000, 3}, {2, 3, 5001, 3},
                               {2, 5, 36, 4}};
  // D 20000 (fp32 / fp64) and 5001 (odd: element-wise): rows too long to hold in registers;
  // D 36: 16-byte vectors for fp32 / fp64 only
  for (const auto& s : shapes) for_each_host([&](auto t) { run_case<decltype(t)>(s); });
  return dit_test::finish("test_gated_residual_cuda");
}
