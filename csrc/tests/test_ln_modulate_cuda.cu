// CUDA ln_modulate kernels vs the CPU kernels (themselves tested against a double-precision
// reference in test_ln_modulate_cpu.cpp). Exits 77 (ctest: skipped) when no GPU is visible.
// fp32 / fp64 / bf16 compare with the CPU kernel on identical inputs; fp16 compares with the CPU
// fp32 kernel run on the fp16-rounded inputs (Host).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "cpu/ln_modulate.h"
#include "cuda/ln_modulate_cuda.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using namespace cuda_test;

template <typename S, typename H = Host<S>, typename C = typename H::C, typename A = typename H::A>
void run_case(const int64_t (&shape)[4]) {
  const double tol = per_host<S>(2e-5, 1e-12, 1.0 / 128, 2e-3);
  const int64_t N = shape[0], T = shape[1], D = shape[2], stride_mult = shape[3];
  std::mt19937 rng(static_cast<uint32_t>(N * 131 + T * 7 + D));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = N * T, srs = std::max<int64_t>(stride_mult * D, 2 * D);
  std::vector<S> x(rows * D), dy(rows * D), mod(N * srs);
  for (int64_t r = 0; r < rows; ++r) {
    const float off = 2.f * nd(rng), sc = std::exp(nd(rng));
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = H::from(off + sc * nd(rng));
  }
  for (auto& v : dy) v = H::from(nd(rng));
  for (auto& v : mod) v = H::from(0.5f * nd(rng));

  // CPU reference on the same values.
  std::vector<C> cx = cpu_copy(x), cdy = cpu_copy(dy),
                 cmod = cpu_copy(mod);
  std::vector<C> ry(rows * D), rdx(rows * D), rds(N * D), rdc(N * D);
  std::vector<A> rm(rows), rr(rows);
  cpu::ln_modulate_fwd(H::cpu_dt, cx.data(), cmod.data(), srs, cmod.data() + D, srs, ry.data(),
                       rm.data(), rr.data(), N, T, D, 1e-6);
  cpu::ln_modulate_bwd(H::cpu_dt, cdy.data(), cx.data(), cmod.data() + D, srs, rm.data(), rr.data(),
                       rdx.data(), rds.data(), rdc.data(), N, T, D);

  Dev<S> gx(x.size()), gdy(dy.size()), gmod(mod.size()), gy(rows * D), gdx(rows * D),
      gds(N * D), gdc(N * D);
  Dev<A> gm(rows), gr(rows);
  gx.put(x), gdy.put(dy), gmod.put(mod);
  CUDA_OK(cuda::ln_modulate_fwd(H::dt, gx.p, gmod.p, srs, gmod.p + D, srs, gy.p, gm.p, gr.p, N, T,
                                D, 1e-6, nullptr));
  CUDA_OK(cuda::ln_modulate_bwd(H::dt, gdy.p, gx.p, gmod.p + D, srs, gm.p, gr.p, gdx.p, gds.p,
                                gdc.p, N, T, D, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  expect_within(
      format("%s N=%lld T=%lld D=%lld", dtype_name(H::dt), (long long)N, (long long)T,
                        (long long)D),
      tol, {{"y", max_rel(gy.get(), ry)}, {"mean", max_rel(gm.get(), rm)},
            {"rstd", max_rel(gr.get(), rr)}, {"dx", max_rel(gdx.get(), rdx)},
            {"dshift", max_rel(gds.get(), rds)}, {"dscale", max_rel(gdc.get(), rdc)}});
}

int main() {
  if (!have_gpu("test_ln_modulate_cuda")) return 77;
  const int64_t shapes[][4] = {{1, 1, 72, 1},    {3, 7, 72, 6},   {1, 257, 1152, 6},
                               {3, 7, 1000, 2},  {2, 3, 1, 1},    {2, 0, 16, 1},
                               {1, 2, 20000, 1}, {2, 3, 5001, 1}, {2, 5, 36, 3}};
  // D 20000 (fp32 / fp64) and 5001 (odd: element-wise): rows too long to hold in registers;
  // D 36: 16-byte vectors for fp32 / fp64 only
  for (const auto& s : shapes) for_each_host([&](auto t) { run_case<decltype(t)>(s); });
  return dit_test::finish("test_ln_modulate_cuda");
}
