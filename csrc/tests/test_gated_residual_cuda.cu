// CUDA gated-residual kernels (fused with LayerNorm-modulate, and plain) vs the CPU kernels (tested
// against a double-precision reference in test_gated_residual_cpu.cpp). Exits 77 (ctest: skipped)
// when no GPU is visible. fp32 / fp64 / bf16 compare with the CPU kernel on identical inputs; fp16
// compares with the CPU fp32 kernel run on the fp16-rounded inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "cpu/gated_residual.h"
#include "cuda/gated_residual_cuda.h"
#include "tests/check.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using cuda_test::Dev;
using cuda_test::max_rel;

// S: device storage type; C: the CPU kernel's storage type (S, or float for fp16); A: stats type.
template <typename S, typename C, typename A>
void run_case(DType dt, DType cpu_dt, int64_t N, int64_t T, int64_t D, int64_t rs_mult, double tol,
              const char* name, S (*from_f)(float), C (*to_cpu)(S)) {
  std::mt19937 rng(static_cast<uint32_t>(N * 131 + T * 7 + D));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = N * T, prs = std::max<int64_t>(rs_mult * D, 3 * D);
  std::vector<S> x(rows * D), y(rows * D), dh(rows * D), dxn(rows * D), par(std::max<int64_t>(N, 1) * prs);
  for (int64_t r = 0; r < rows; ++r) {
    const float off = nd(rng), sc = std::exp(0.5f * nd(rng));
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = from_f(off + sc * nd(rng));
  }
  for (auto* v : {&y, &dh, &dxn})
    for (auto& e : *v) e = from_f(nd(rng));
  for (auto& v : par) v = from_f(0.5f * nd(rng));
  auto cpu_copy = [&](const std::vector<S>& v) {
    std::vector<C> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = to_cpu(v[i]);
    return o;
  };
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
  const double e[] = {max_rel(gxn.get(), rxn), max_rel(gh.get(), rh),   max_rel(gm.get(), rm),
                      max_rel(gr.get(), rr),   max_rel(gdx.get(), rdx), max_rel(gdy.get(), rdy),
                      max_rel(gdg.get(), rdg), max_rel(gds.get(), rds), max_rel(gdc.get(), rdc),
                      max_rel(gout.get(), rout), max_rel(gpdy.get(), rpdy),
                      max_rel(gpdg.get(), rpdg)};
  const char* what[] = {"x_new", "h",     "mean",   "rstd",      "dx",       "dy",
                        "dgate", "dshift", "dscale", "plain out", "plain dy", "plain dgate"};
  for (int i = 0; i < 12; ++i)
    CHECK(e[i] <= tol, "%s N=%lld T=%lld D=%lld: %s rel err %.3g > %.3g", name, (long long)N,
          (long long)T, (long long)D, what[i], e[i], tol);
}

float f_id(float v) { return v; }
double d_of(float v) { return v; }
double d_id(double v) { return v; }
bf16 bf_of(float v) { return to_bf16(v); }
bf16 bf_id(bf16 v) { return v; }
__half h_of(float v) { return __float2half_rn(v); }
float h_to_f(__half v) { return __half2float(v); }
float f_to_f(float v) { return v; }

int main() {
  if (!cuda_test::have_gpu("test_gated_residual_cuda")) return 77;
  const int64_t shapes[][4] = {{1, 1, 72, 3},   {3, 7, 72, 6}, {1, 257, 1152, 6}, {3, 7, 1000, 3},
                               {2, 3, 1, 3},    {2, 0, 16, 3}, {1, 2, 20000, 3}, {2, 3, 5001, 3},
                               {2, 5, 36, 4}};
  // D 20000 (fp32 / fp64) and 5001 (odd: element-wise): rows too long to hold in registers;
  // D 36: 16-byte vectors for fp32 / fp64 only
  for (const auto& s : shapes) {
    run_case<float, float, float>(DType::kFloat32, DType::kFloat32, s[0], s[1], s[2], s[3], 2e-5,
                                  "float32", f_id, f_to_f);
    run_case<double, double, double>(DType::kFloat64, DType::kFloat64, s[0], s[1], s[2], s[3],
                                     1e-12, "float64", d_of, d_id);
    run_case<bf16, bf16, float>(DType::kBFloat16, DType::kBFloat16, s[0], s[1], s[2], s[3],
                                1.0 / 64, "bfloat16", bf_of, bf_id);
    run_case<__half, float, float>(DType::kFloat16, DType::kFloat32, s[0], s[1], s[2], s[3], 4e-3,
                                   "float16", h_of, h_to_f);
  }
  return dit_test::finish("test_gated_residual_cuda");
}
