// CUDA bias + GELU(tanh) kernels vs the CPU kernels (tested against a double-precision reference in
// test_gelu_cpu.cpp): forward (also in place), backward (dh, dbias). Exits 77 (ctest: skipped)
// when no GPU is visible. fp16 compares with the CPU fp32 kernel on the fp16-rounded inputs.
#include <cstdint>
#include <random>
#include <vector>

#include "cpu/gelu.h"
#include "cuda/gelu_cuda.h"
#include "tests/cuda_test_util.cuh"

using namespace dit_fast;
using namespace cuda_test;

template <typename S, typename H = Host<S>, typename C = typename H::C>
void run_case(const int64_t (&shape)[2]) {
  const double tol = per_host<S>(1e-5, 1e-12, 1.0 / 64, 4e-3);
  const int64_t M = shape[0], F = shape[1];
  std::mt19937 rng(static_cast<uint32_t>(M * 31 + F));
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<S> h(M * F), dout(M * F), bias(F);
  for (auto& v : h) v = H::from(2.5f * nd(rng));
  for (auto& v : dout) v = H::from(nd(rng));
  for (auto& v : bias) v = H::from(0.5f * nd(rng));
  std::vector<C> ch = cpu_copy(h), cd = cpu_copy(dout), cb = cpu_copy(bias), rout(M * F),
                 rdh(M * F), rdb(F);
  cpu::gelu_bias_fwd(H::cpu_dt, ch.data(), cb.data(), rout.data(), M, F);
  cpu::gelu_bias_bwd(H::cpu_dt, cd.data(), ch.data(), cb.data(), rdh.data(), rdb.data(), M, F);

  Dev<S> gh(h.size()), gd(dout.size()), gb(F), gout(M * F), gdh(M * F), gdb(F), ginp(h.size());
  Dev<unsigned char> ws(cuda::gelu_bias_bwd_workspace_bytes(M, F));
  gh.put(h), gd.put(dout), gb.put(bias), ginp.put(h);
  CUDA_OK(cuda::gelu_bias_fwd(H::dt, gh.p, gb.p, gout.p, M, F, nullptr));
  CUDA_OK(cuda::gelu_bias_fwd(H::dt, ginp.p, gb.p, ginp.p, M, F, nullptr));  // in place
  CUDA_OK(cuda::gelu_bias_bwd(H::dt, gd.p, gh.p, gb.p, gdh.p, gdb.p, ws.p, M, F, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<S> out = gout.get(), inp = ginp.get();
  const std::string where = format("%s M=%lld F=%lld", dtype_name(H::dt), (long long)M,
                                              (long long)F);
  expect_within(where, tol, {{"out", max_rel(out, rout)}, {"dh", max_rel(gdh.get(), rdh)},
                                        {"dbias", max_rel(gdb.get(), rdb)}});
  CHECK(max_rel(inp, out) == 0, "%s: in-place forward differs", where.c_str());
}

int main() {
  if (!have_gpu("test_gelu_cuda")) return 77;
  const int64_t shapes[][2] = {{1, 72}, {7, 1000}, {257, 1152}, {3000, 33}, {0, 16}, {5, 4608}};
  for (const auto& s : shapes) for_each_host([&](auto t) { run_case<decltype(t)>(s); });
  return dit_test::finish("test_gelu_cuda");
}
