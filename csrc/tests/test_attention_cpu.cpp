// CPU attention forward vs a naive double-precision reference: out and lse, for fp32 / fp64 /
// bf16, every compiled ISA path, padded and strided qkv rows, ragged token counts and odd head
// dims, and thread-count independence (bitwise).
#include "cpu/attention.h"
#include "tests/check.h"

using namespace dit_fast;
using namespace dit_test;

struct Case {
  int64_t N, T, H, Dh, row_pad, token_step;  // qkv row stride (3D + row_pad) * token_step
};

template <typename T>
int run_case(const Case& c, int num_threads, std::vector<T>* out_copy = nullptr) {
  using Tr = Storage<T>;
  // relative to max |value|
  const double out_tol = per_storage<T>(2e-6, 1e-13, 1.0 / 128),
               lse_tol = per_storage<T>(2e-6, 1e-13, 2e-6);
  using A = typename Tr::A;
  const int64_t D = c.H * c.Dh, st = (3 * D + c.row_pad) * c.token_step, sn = st * c.T;
  std::vector<T> qkv(c.N * sn);
  std::mt19937 rng(static_cast<uint32_t>(c.T * 131 + c.Dh));
  std::normal_distribution<double> nd(0.0, 1.5);
  for (auto& v : qkv) v = Tr::from(nd(rng));
  std::vector<T> out(c.N * c.T * D);
  std::vector<A> lse(c.N * c.H * c.T);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.Dh));
  const Status s = cpu::attention_fwd(Tr::dtype, qkv.data(), sn, st, out.data(), lse.data(), c.N,
                                      c.T, c.H, c.Dh, scale, num_threads);
  CHECK(s == Status::kOk, "status %s", status_name(s));
  if (out_copy) *out_copy = out;
  auto at = [&](int64_t n, int64_t t, int64_t which, int64_t h, int64_t d) {
    return Tr::to(qkv[n * sn + t * st + which * D + h * c.Dh + d]);
  };
  double out_err = 0, out_mag = 1e-30, lse_err = 0, lse_mag = 1e-30;
  std::vector<double> sc(c.T);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.T; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.T; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < c.Dh; ++d) acc += at(n, i, 0, h, d) * at(n, j, 1, h, d);
          sc[j] = acc * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < c.T; ++j) sum += std::exp(sc[j] - mx);
        const double want_lse = mx + std::log(sum);
        lse_err = std::max(lse_err, std::fabs(static_cast<double>(lse[(n * c.H + h) * c.T + i]) - want_lse));
        lse_mag = std::max(lse_mag, std::fabs(want_lse));
        for (int64_t d = 0; d < c.Dh; ++d) {
          double o = 0;
          for (int64_t j = 0; j < c.T; ++j) o += std::exp(sc[j] - mx) / sum * at(n, j, 2, h, d);
          out_err = std::max(out_err, std::fabs(Tr::to(out[(n * c.T + i) * D + h * c.Dh + d]) - o));
          out_mag = std::max(out_mag, std::fabs(o));
        }
      }
  CHECK(out_err <= out_tol * out_mag, "%s N=%lld T=%lld H=%lld Dh=%lld: out err %.3g (mag %.3g)",
        dtype_name(Tr::dtype), (long long)c.N, (long long)c.T, (long long)c.H, (long long)c.Dh,
        out_err, out_mag);
  CHECK(lse_err <= lse_tol * lse_mag, "%s N=%lld T=%lld H=%lld Dh=%lld: lse err %.3g",
        dtype_name(Tr::dtype), (long long)c.N, (long long)c.T, (long long)c.H, (long long)c.Dh,
        lse_err);
  return 0;
}

template <typename T>
void all_cases() {
  const Case cases[] = {{1, 1, 2, 64, 0, 1},  {2, 7, 3, 64, 0, 1},  {1, 65, 2, 72, 8, 1},
                        {1, 130, 1, 64, 0, 2}, {2, 17, 2, 5, 3, 1},  {1, 64, 1, 128, 0, 1}};
  for (const Case& c : cases) run_case<T>(c, 0);
}

int main() {
  for_each_isa([](cpu::Isa isa) {
    std::printf("ISA %s\n", cpu::isa_name(isa));
    for_each_storage([](auto t) { all_cases<decltype(t)>(); });
  });
  // thread-count independence (bitwise)
  std::vector<float> o1, o3;
  run_case<float>({2, 130, 3, 72, 0, 1}, 1, &o1);
  run_case<float>({2, 130, 3, 72, 0, 1}, 3, &o3);
  CHECK(o1 == o3, "results depend on the thread count");
  // argument validation
  CHECK(cpu::attention_fwd(DType::kFloat32, nullptr, 0, 0, nullptr, nullptr, -1, 1, 1, 1, 1.0) ==
            Status::kInvalidArgument, "negative N accepted");
  CHECK(cpu::attention_fwd(DType::kFloat16, nullptr, 0, 0, nullptr, nullptr, 1, 1, 1, 1, 1.0) ==
            Status::kUnsupportedDType, "float16 accepted");
  CHECK(cpu::attention_fwd(DType::kFloat32, nullptr, 0, 0, nullptr, nullptr, 0, 5, 1, 8, 1.0) ==
            Status::kOk, "empty batch rejected");
  return dit_test::finish("test_attention_cpu");
}
