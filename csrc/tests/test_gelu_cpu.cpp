// CPU bias + GELU(tanh) kernels vs an independent double-precision reference written with tanh
// (0.5 v (1 + tanh(u)), torch's formula): forward and backward (dh, dbias), fp32 / fp64 / bf16,
// every compiled ISA path, row tails (F not a multiple of 8), in-place forward, dh aliasing dout,
// extreme inputs, thread-count independence (bitwise); plus the accuracy of the AVX2 exp.
#include <limits>

#include "common/gelu.h"
#include "cpu/gelu.h"
#include "cpu/vec_avx2.h"
#include "tests/check.h"

using namespace dit_fast;
using namespace dit_test;

double ref_gelu(double v) {
  const double u = gelu::kBeta * (v + gelu::kKappa * v * v * v);
  return 0.5 * v * (1.0 + std::tanh(u));
}
double ref_grad(double v) {
  const double u = gelu::kBeta * (v + gelu::kKappa * v * v * v);
  const double t = std::tanh(u);
  return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * gelu::kBeta * (1.0 + 3.0 * gelu::kKappa * v * v);
}

template <typename T>
std::vector<T> random_vec(size_t n, std::mt19937& rng, double sd, double mean = 0.0) {
  std::normal_distribution<double> nd(mean, sd);
  std::vector<T> v(n);
  for (auto& x : v) x = Storage<T>::from(nd(rng));
  return v;
}

template <typename T>
void test_case(int64_t M, int64_t F, uint32_t seed) {
  using Tr = Storage<T>;
  // |err| <= rtol |want| + atol * scale, scale = max(1, |v|); bf16: one rounding of an fp32 result
  const double rtol = per_storage<T>(2e-6, 1e-13, 1.0 / 256),
               atol = per_storage<T>(2e-7, 1e-15, 1e-6);
  std::mt19937 rng(seed);
  std::vector<T> h = random_vec<T>(M * F, rng, 2.5), bias = random_vec<T>(F, rng, 0.5),
                 dout = random_vec<T>(M * F, rng, 1.0);
  if (M * F > 3) {  // extreme values: far in both tails (incl. the flushed region)
    h[0] = Tr::from(-30.0), h[1] = Tr::from(25.0), h[2] = Tr::from(-9.0), h[3] = Tr::from(1e-30);
  }
  const char* isa = cpu::isa_name(cpu::active_isa());
  std::vector<T> out(M * F), dh(M * F), dbias(F);
  CHECK(cpu::gelu_bias_fwd(Tr::dtype, h.data(), bias.data(), out.data(), M, F, 1) == Status::kOk,
        "fwd status");
  CHECK(cpu::gelu_bias_bwd(Tr::dtype, dout.data(), h.data(), bias.data(), dh.data(), dbias.data(),
                           M, F, 1) == Status::kOk,
        "bwd status");
  std::vector<double> want_db(F, 0.0);
  int bad = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) {
      const int64_t i = m * F + f;
      const double v = Tr::to(h[i]) + Tr::to(bias[f]);
      // fp32 / bf16 compute v = h + b in fp32 first: use that value for the reference
      const double vr = std::is_same<T, double>::value ? v : static_cast<double>(static_cast<float>(v));
      const double y = ref_gelu(vr), g = Tr::to(dout[i]) * ref_grad(vr);
      want_db[f] += g;
      const double scale = std::fmax(1.0, std::fabs(vr));
      const double ey = std::fabs(Tr::to(out[i]) - y), eg = std::fabs(Tr::to(dh[i]) - g);
      if (!(ey <= rtol * std::fabs(y) + atol * scale) && bad++ < 5)
        CHECK(false, "%s M=%lld F=%lld: gelu(%.9g) = %.9g, want %.9g", isa, (long long)M,
              (long long)F, vr, Tr::to(out[i]), y);
      const double gs = std::fabs(Tr::to(dout[i])) * scale;
      if (!(eg <= rtol * std::fabs(g) + 4 * atol * gs) && bad++ < 5)
        CHECK(false, "%s M=%lld F=%lld: dh at v=%.9g = %.9g, want %.9g", isa, (long long)M,
              (long long)F, vr, Tr::to(dh[i]), g);
    }
  CHECK(bad == 0, "%s M=%lld F=%lld: %d bad elements", isa, (long long)M, (long long)F, bad);
  // dbias: fp32 sums over M rows; bf16 adds one rounding
  double mag = 1e-30, err = 0;
  for (int64_t f = 0; f < F; ++f) {
    mag = std::fmax(mag, std::fabs(want_db[f]));
    err = std::fmax(err, std::fabs(Tr::to(dbias[f]) - want_db[f]));
  }
  const double db_tol = std::is_same<T, double>::value ? 1e-12 : (std::is_same<T, float>::value ? 2e-5 : 1.0 / 128);
  CHECK(F == 0 || err <= db_tol * mag, "%s M=%lld F=%lld: dbias rel err %.3g", isa, (long long)M,
        (long long)F, err / mag);

  // in place (out == h) and dh == dout give identical bits; so do 2 and 3 threads
  std::vector<T> hin = h, dio = dout;
  cpu::gelu_bias_fwd(Tr::dtype, hin.data(), bias.data(), hin.data(), M, F, 2);
  std::vector<T> db2(F);
  cpu::gelu_bias_bwd(Tr::dtype, dio.data(), h.data(), bias.data(), dio.data(), db2.data(), M, F, 3);
  const size_t bytes = sizeof(T) * M * F;
  CHECK(bytes == 0 || std::memcmp(hin.data(), out.data(), bytes) == 0, "%s in-place fwd differs", isa);
  CHECK(bytes == 0 || std::memcmp(dio.data(), dh.data(), bytes) == 0, "%s aliased bwd differs", isa);
  CHECK(F == 0 || std::memcmp(db2.data(), dbias.data(), sizeof(T) * F) == 0,
        "%s dbias depends on the thread count", isa);
}

#if DIT_CPU_HAVE_AVX2_PATH
DIT_TARGET_AVX2 void exp_avx2(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, cpu::avx2::exp8(_mm256_loadu_ps(x + i)));
}

void test_exp8() {
  const int64_t n = 1 << 20;
  std::vector<float> x(n), y(n);
  for (int64_t i = 0; i < n; ++i) x[i] = -87.0f + 174.0f * static_cast<float>(i) / static_cast<float>(n - 1);
  exp_avx2(x.data(), y.data(), n);
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::fmax(worst, std::fabs(y[i] - want) / want);
  }
  std::printf("exp8 max rel err over [-87, 87]: %.3g (%.2f x 2^-23)\n", worst, worst / 0x1p-23);
  CHECK(worst < 2.5e-7, "exp8 max rel err %.3g", worst);
}
#endif

int main() {
#if DIT_CPU_HAVE_AVX2_PATH
  if (cpu::isa_supported(cpu::Isa::kAvx2)) test_exp8();
#endif
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {1, 8}, {5, 72}, {2, 1000}, {3, 1152}, {257, 17},
                               {0, 16}, {4, 0}, {70, 33}};
  // Exact special values: gelu(0) = 0, gelu(+inf) = inf, NaN propagates, the far negative tail
  // is exactly zero.
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float h[8] = {0.0f, inf, nan, -50.0f, -1e30f, 1e30f, 3.0f, -0.5f}, b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for_each_isa([&](cpu::Isa isa) {
    uint32_t seed = 1;
    for (const auto& s : shapes) {
      for_each_storage([&](auto t) { test_case<decltype(t)>(s[0], s[1], seed); });
      ++seed;
    }
    float o[8];
    cpu::gelu_bias_fwd(DType::kFloat32, h, b, o, 1, 8, 1);
    CHECK(o[0] == 0.0f && o[1] == inf && std::isnan(o[2]) && o[3] == 0.0f && o[4] == 0.0f &&
              o[5] == 1e30f,
          "%s special values: %g %g %g %g %g %g", cpu::isa_name(isa), o[0], o[1], o[2], o[3],
          o[4], o[5]);
  });
  float buf[4] = {0, 0, 0, 0};
  CHECK(cpu::gelu_bias_fwd(DType::kFloat16, buf, buf, buf, 1, 1) == Status::kUnsupportedDType,
        "float16 must be rejected on CPU");
  CHECK(cpu::gelu_bias_fwd(DType::kFloat32, buf, buf, buf, -1, 1) == Status::kInvalidArgument,
        "negative M must be rejected");
  CHECK(cpu::gelu_bias_bwd(DType::kFloat32, buf, buf, buf, buf, buf, 1, -1) == Status::kInvalidArgument,
        "negative F must be rejected");
  return dit_test::finish("test_gelu_cpu");
}
