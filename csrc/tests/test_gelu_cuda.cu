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
using cuda_test::Dev;
using cuda_test::max_rel;

template <typename S>
void run_case(const int64_t (&shape)[2], double tol) {
  using H = cuda_test::Host<S>;
  using C = typename H::C;
  const DType dt = H::dt, cpu_dt = H::cpu_dt;
  const int64_t M = shape[0], F = shape[1];
  std::mt19937 rng(static_cast<uint32_t>(M * 31 + F));
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<S> h(M * F), dout(M * F), bias(F);
  for (auto& v : h) v = H::from(2.5f * nd(rng));
  for (auto& v : dout) v = H::from(nd(rng));
  for (auto& v : bias) v = H::from(0.5f * nd(rng));
  using cuda_test::cpu_copy;
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
  const std::string where = cuda_test::format("%s M=%lld F=%lld", dtype_name(dt), (long long)M,
                                              (long long)F);
  cuda_test::expect_within(where, tol, {{"out", max_rel(out, rout)}, {"dh", max_rel(gdh.get(), rdh)},
                                        {"dbias", max_rel(gdb.get(), rdb)}});
  CHECK(max_rel(inp, out) == 0, "%s: in-place forward differs", where.c_str());
}

int main() {
  if (!cuda_test::have_gpu("test_gelu_cuda")) return 77;
  const int64_t shapes[][2] = {{1, 72}, {7, 1000}, {257, 1152}, {3000, 33}, {0, 16}, {5, 4608}};
  for (const auto& s : shapes) {
    run_case<float>(s, 1e-5);
    run_case<double>(s, 1e-12);
    run_case<bf16>(s, 1.0 / 64);
    run_case<__half>(s, 4e-3);
  }
  return dit_test::finish("test_gelu_cuda");
}
