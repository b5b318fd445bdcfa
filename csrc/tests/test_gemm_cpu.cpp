// CPU GEMM (cpu/gemm.h) vs a double-precision triple loop: every compiled ISA path, float32 and
// bf16 operands, tile and K-block edges (M not a multiple of 6 / kMc, N not a multiple of 16, K
// across the K block), bias / no bias, the GELU epilogue, a row stride larger than the width (ldx,
// ldo), K = 0, thread-count independence (bitwise), and argument errors.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/bf16.h"
#include "common/gelu.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "tests/check.h"

using namespace dit_fast;

double ref_gelu(double v) {
  const double u = gelu::kBeta * (v + gelu::kKappa * v * v * v);
  return 0.5 * v * (1.0 + std::tanh(u));
}

double value(float v) { return v; }
double value(bf16 v) { return to_float(v); }
void set(float* d, float v) { *d = v; }
void set(bf16* d, float v) { *d = to_bf16(v); }

// Output rounding: none for float32; bf16 rounds once (half an ulp: 2^-9 relative).
double rounding(float, double) { return 0.0; }
double rounding(bf16, double want) { return std::ldexp(std::fabs(want), -8); }

template <typename T>
void test_case(int64_t M, int64_t N, int64_t K, bool with_bias, cpu::Epilogue ep, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t ldx = K + 3, ldo = N + 5;  // strided rows
  const T sentinel = [] { T t; set(&t, -7.f); return t; }();
  std::vector<T> x(M * ldx), w(N * K), bias(N), out(M * ldo, sentinel), out1(M * ldo, sentinel);
  for (auto& v : x) set(&v, nd(rng));
  for (auto& v : w) set(&v, nd(rng) / std::sqrt(static_cast<float>(K > 0 ? K : 1)));
  for (auto& v : bias) set(&v, nd(rng));
  const T* b = with_bias ? bias.data() : nullptr;
  CHECK(cpu::linear_fwd(x.data(), ldx, w.data(), b, out.data(), ldo, M, N, K, ep, 0) == Status::kOk,
        "fwd status");
  CHECK(cpu::linear_fwd(x.data(), ldx, w.data(), b, out1.data(), ldo, M, N, K, ep, 1) == Status::kOk,
        "fwd status (1 thread)");
  const char* isa = cpu::isa_name(cpu::active_isa());
  const char* dt = sizeof(T) == 2 ? "bf16" : "f32";
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = with_bias ? value(bias[n]) : 0.0, mag = std::fabs(acc);
      for (int64_t k = 0; k < K; ++k) {
        acc += value(x[m * ldx + k]) * value(w[n * K + k]);
        mag += std::fabs(value(x[m * ldx + k]) * value(w[n * K + k]));
      }
      const double want = ep == cpu::Epilogue::kGelu ? ref_gelu(acc) : acc;
      const double got = value(out[m * ldo + n]);
      // fp32 summation of K + 1 terms: |err| <= ~K eps sum|terms| (loose), plus the GELU's ulps
      // and the output's rounding
      const double tol = (K + 2) * 6e-8 * mag + 1e-6 * (1 + std::fabs(want)) +
                         rounding(T{}, want) * 1.01;
      CHECK(std::fabs(got - want) <= tol, "%s %s M=%lld N=%lld K=%lld (%lld,%lld): got %.9g want %.9g",
            isa, dt, (long long)M, (long long)N, (long long)K, (long long)m, (long long)n, got, want);
      CHECK(value(out1[m * ldo + n]) == got, "%s %s thread-count dependence at (%lld,%lld)", isa, dt,
            (long long)m, (long long)n);
    }
    for (int64_t n = N; n < ldo; ++n)
      CHECK(value(out[m * ldo + n]) == -7.0, "%s %s wrote past N in the row stride", isa, dt);
  }
}

int main() {
  std::vector<cpu::Isa> isas;
  for (cpu::Isa isa : {cpu::Isa::kGeneric, cpu::Isa::kAvx2})
    if (cpu::isa_supported(isa)) isas.push_back(isa);
  // K across 1-3 K blocks (kGemmKc), M across several row blocks (kGemmMc) and odd tails; the
  // few-rows path (M <= kGemmSmallM) at its edge, N not a multiple of its 4-column tiles
  const int64_t kc = cpu::kGemmKc, mc = cpu::kGemmMc, sm = cpu::kGemmSmallM;
  const int64_t shapes[][3] = {{1, 1, 1},       {5, 3, 7},          {6, 16, 16},
                               {7, 17, kc - 1}, {49, 33, kc},       {97, 100, kc + 1},
                               {mc + 34, 72, 2 * kc + 88}, {2 * mc + 5, 24, 40}, {3, 40, 0},
                               {sm, 37, 100},   {sm + 1, 37, 100},  {2, 4099, 9}};
  uint32_t seed = 1;
  for (cpu::Isa isa : isas) {
    CHECK(cpu::set_isa(isa), "set_isa(%s)", cpu::isa_name(isa));
    for (const auto& s : shapes)
      for (bool bias : {true, false})
        for (cpu::Epilogue ep : {cpu::Epilogue::kNone, cpu::Epilogue::kGelu}) {
          test_case<float>(s[0], s[1], s[2], bias, ep, seed++);
          test_case<bf16>(s[0], s[1], s[2], bias, ep, seed++);
        }
  }
  cpu::set_isa(cpu::Isa::kAuto);
  float dummy[16] = {};
  CHECK(cpu::linear_fwd(dummy, 1, dummy, nullptr, dummy, 1, 1, 1, 2, cpu::Epilogue::kNone) ==
            Status::kInvalidArgument, "ldx < K must be rejected");
  CHECK(cpu::linear_fwd(dummy, 2, dummy, nullptr, dummy, 0, 1, 1, 2, cpu::Epilogue::kNone) ==
            Status::kInvalidArgument, "ldo < N must be rejected");
  CHECK(cpu::linear_fwd(dummy, 2, static_cast<const float*>(nullptr), nullptr, dummy, 2, 1, 2, 2,
                        cpu::Epilogue::kNone) == Status::kInvalidArgument, "null weight");
  return dit_test::finish("test_gemm_cpu");
}
