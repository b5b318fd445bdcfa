// CUDA bias + GELU(tanh) kernels vs the CPU kernels (tested against a double-precision reference in
// test_gelu_cpu.cpp): forward (also in place), backward (dh, dbias). Exits 77 (ctest: skipped)
// when no GPU is visible. fp16 compares with the CPU fp32 kernel on the fp16-rounded inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "cpu/gelu.h"
#include "cuda/gelu_cuda.h"
#include "tests/check.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using cuda_test::Dev;
using cuda_test::max_rel;

template <typename S, typename C>
void run_case(DType dt, DType cpu_dt, int64_t M, int64_t F, double tol, const char* name,
              S (*from_f)(float), C (*to_cpu)(S)) {
  std::mt19937 rng(static_cast<uint32_t>(M * 31 + F));
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<S> h(M * F), dout(M * F), bias(F);
  for (auto& v : h) v = from_f(2.5f * nd(rng));
  for (auto& v : dout) v = from_f(nd(rng));
  for (auto& v : bias) v = from_f(0.5f * nd(rng));
  auto cpu_copy = [&](const std::vector<S>& v) {
    std::vector<C> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = to_cpu(v[i]);
    return o;
  };
  std::vector<C> ch = cpu_copy(h), cd = cpu_copy(dout), cb = cpu_copy(bias), rout(M * F),
                 rdh(M * F), rdb(F);
  cpu::gelu_bias_fwd(cpu_dt, ch.data(), cb.data(), rout.data(), M, F);
  cpu::gelu_bias_bwd(cpu_dt, cd.data(), ch.data(), cb.data(), rdh.data(), rdb.data(), M, F);

  Dev<S> gh(h.size()), gd(dout.size()), gb(F), gout(M * F), gdh(M * F), gdb(F), ginp(h.size());
  Dev<unsigned char> ws(cuda::gelu_bias_bwd_workspace_bytes(M, F));
  gh.put(h), gd.put(dout), gb.put(bias), ginp.put(h);
  CUDA_OK(cuda::gelu_bias_fwd(dt, gh.p, gb.p, gout.p, M, F, nullptr));
  CUDA_OK(cuda::gelu_bias_fwd(dt, ginp.p, gb.p, ginp.p, M, F, nullptr));  // in place
  CUDA_OK(cuda::gelu_bias_bwd(dt, gd.p, gh.p, gb.p, gdh.p, gdb.p, ws.p, M, F, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<S> out = gout.get(), inp = ginp.get();
  const double e[] = {max_rel(out, rout), max_rel(gdh.get(), rdh), max_rel(gdb.get(), rdb)};
  const char* what[] = {"out", "dh", "dbias"};
  for (int i = 0; i < 3; ++i)
    CHECK(e[i] <= tol, "%s M=%lld F=%lld: %s rel err %.3g > %.3g", name, (long long)M,
          (long long)F, what[i], e[i], tol);
  CHECK(max_rel(inp, out) == 0, "%s M=%lld F=%lld: in-place forward differs", name, (long long)M,
        (long long)F);
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
  if (!cuda_test::have_gpu("test_gelu_cuda")) return 77;
  const int64_t shapes[][2] = {{1, 72}, {7, 1000}, {257, 1152}, {3000, 33}, {0, 16}, {5, 4608}};
  for (const auto& s : shapes) {
    run_case<float, float>(DType::kFloat32, DType::kFloat32, s[0], s[1], 1e-5, "float32", f_id,
                           f_to_f);
    run_case<double, double>(DType::kFloat64, DType::kFloat64, s[0], s[1], 1e-12, "float64", d_of,
                             d_id);
    run_case<bf16, bf16>(DType::kBFloat16, DType::kBFloat16, s[0], s[1], 1.0 / 64, "bfloat16",
                         bf_of, bf_id);
    run_case<__half, float>(DType::kFloat16, DType::kFloat32, s[0], s[1], 4e-3, "float16", h_of,
                            h_to_f);
  }
  return dit_test::finish("test_gelu_cuda");
}
