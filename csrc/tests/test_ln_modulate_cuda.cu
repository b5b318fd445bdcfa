// CUDA ln_modulate kernels vs the CPU kernels (themselves tested against a double-precision
// reference in test_ln_modulate_cpu.cpp). Exits 77 (ctest: skipped) when no GPU is visible.
// fp32 / fp64 / bf16 compare with the CPU kernel on identical inputs; fp16 compares with the CPU
// fp32 kernel run on the fp16-rounded inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "cpu/ln_modulate.h"
#include "cuda/ln_modulate_cuda.h"
#include "tests/check.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using cuda_test::Dev;
using cuda_test::max_rel;

// S: host storage type; C: the CPU kernel's storage type used as reference (same as S except for
// fp16, where C = float); A: stats type.
template <typename S, typename C, typename A>
void run_case(DType dt, DType cpu_dt, int64_t N, int64_t T, int64_t D, int64_t stride_mult,
              double tol, const char* name, S (*from_f)(float), C (*to_cpu)(S)) {
  std::mt19937 rng(static_cast<uint32_t>(N * 131 + T * 7 + D));
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t rows = N * T, srs = std::max<int64_t>(stride_mult * D, 2 * D);
  std::vector<S> x(rows * D), dy(rows * D), mod(N * srs);
  for (int64_t r = 0; r < rows; ++r) {
    const float off = 2.f * nd(rng), sc = std::exp(nd(rng));
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = from_f(off + sc * nd(rng));
  }
  for (auto& v : dy) v = from_f(nd(rng));
  for (auto& v : mod) v = from_f(0.5f * nd(rng));

  // CPU reference on the same values.
  std::vector<C> cx(x.size()), cdy(dy.size()), cmod(mod.size());
  for (size_t i = 0; i < x.size(); ++i) cx[i] = to_cpu(x[i]);
  for (size_t i = 0; i < dy.size(); ++i) cdy[i] = to_cpu(dy[i]);
  for (size_t i = 0; i < mod.size(); ++i) cmod[i] = to_cpu(mod[i]);
  std::vector<C> ry(rows * D), rdx(rows * D), rds(N * D), rdc(N * D);
  std::vector<A> rm(rows), rr(rows);
  cpu::ln_modulate_fwd(cpu_dt, cx.data(), cmod.data(), srs, cmod.data() + D, srs, ry.data(),
                       rm.data(), rr.data(), N, T, D, 1e-6);
  cpu::ln_modulate_bwd(cpu_dt, cdy.data(), cx.data(), cmod.data() + D, srs, rm.data(), rr.data(),
                       rdx.data(), rds.data(), rdc.data(), N, T, D);

  Dev<S> gx(x.size()), gdy(dy.size()), gmod(mod.size()), gy(rows * D), gdx(rows * D),
      gds(N * D), gdc(N * D);
  Dev<A> gm(rows), gr(rows);
  gx.put(x), gdy.put(dy), gmod.put(mod);
  CUDA_OK(cuda::ln_modulate_fwd(dt, gx.p, gmod.p, srs, gmod.p + D, srs, gy.p, gm.p, gr.p, N, T, D,
                                1e-6, nullptr));
  CUDA_OK(cuda::ln_modulate_bwd(dt, gdy.p, gx.p, gmod.p + D, srs, gm.p, gr.p, gdx.p, gds.p, gdc.p,
                                N, T, D, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const double e[] = {max_rel(gy.get(), ry),   max_rel(gm.get(), rm),   max_rel(gr.get(), rr),
                      max_rel(gdx.get(), rdx), max_rel(gds.get(), rds), max_rel(gdc.get(), rdc)};
  const char* what[] = {"y", "mean", "rstd", "dx", "dshift", "dscale"};
  for (int i = 0; i < 6; ++i)
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
  if (!cuda_test::have_gpu("test_ln_modulate_cuda")) return 77;
  const int64_t shapes[][4] = {{1, 1, 72, 1},    {3, 7, 72, 6},   {1, 257, 1152, 6},
                               {3, 7, 1000, 2},  {2, 3, 1, 1},    {2, 0, 16, 1},
                               {1, 2, 20000, 1}, {2, 3, 5001, 1}, {2, 5, 36, 3}};
  // D 20000 (fp32 / fp64) and 5001 (odd: element-wise): rows too long to hold in registers;
  // D 36: 16-byte vectors for fp32 / fp64 only
  for (const auto& s : shapes) {
    run_case<float, float, float>(DType::kFloat32, DType::kFloat32, s[0], s[1], s[2], s[3], 2e-5,
                                  "float32", f_id, f_to_f);
    run_case<double, double, double>(DType::kFloat64, DType::kFloat64, s[0], s[1], s[2], s[3],
                                     1e-12, "float64", d_of, d_id);
    run_case<bf16, bf16, float>(DType::kBFloat16, DType::kBFloat16, s[0], s[1], s[2], s[3],
                                1.0 / 128, "bfloat16", bf_of, bf_id);
    run_case<__half, float, float>(DType::kFloat16, DType::kFloat32, s[0], s[1], s[2], s[3],
                                   2e-3, "float16", h_of, h_to_f);
  }
  return dit_test::finish("test_ln_modulate_cuda");
}
