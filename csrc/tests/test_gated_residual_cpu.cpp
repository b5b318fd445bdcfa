// CPU gated-residual kernels (fused with LayerNorm-modulate, and plain) vs a naive
// double-precision reference: forward (x_new, h, mean, rstd), backward (dx, dy, dgate, dshift,
// dscale; with and without dx_new), fp32 / fp64 / bf16, every compiled ISA path, strided and
// broadcast (stride 0) parameter rows, in-place x_new, edge shapes, and thread-count independence
// (bitwise). For bf16 the reference LayerNorm is taken of the stored (rounded) x_new, the op's
// documented semantics.
#include "cpu/gated_residual.h"
#include "tests/check.h"

using namespace dit_fast;
using namespace dit_test;

struct Case {
  int64_t N, T, D, rs_mult;  // parameter row stride = rs_mult * D (0: one row broadcast)
};

template <typename T>
void test_case(const Case& c, uint32_t seed) {
  using Tr = Storage<T>;
  // relative to the tensor's max
  const double fwd_tol = per_storage<T>(1e-5, 1e-12, 1.0 / 128),
               bwd_tol = per_storage<T>(2e-5, 1e-11, 1.0 / 64);
  const char* tname = dtype_name(Tr::dtype);
  using A = typename Tr::A;
  const int64_t N = c.N, Tn = c.T, D = c.D, rows = N * Tn;
  const int64_t rs = c.rs_mult * D;
  const double eps = 1e-6;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> x(rows * D), y(rows * D), dh(rows * D), dxn(rows * D);
  for (int64_t r = 0; r < rows; ++r) {
    const double off = 2.0 * nd(rng), sc = std::exp(0.5 * nd(rng));
    for (int64_t i = 0; i < D; ++i) {
      x[r * D + i] = Tr::from(off + sc * nd(rng));
      y[r * D + i] = Tr::from(nd(rng));
    }
  }
  for (auto& v : dh) v = Tr::from(nd(rng));
  for (auto& v : dxn) v = Tr::from(nd(rng));
  // parameters: (max(N,1) rows) x (3 * max(rs, D)) buffer: gate at 0, shift at D, scale at 2D
  const int64_t prs = std::max<int64_t>(rs, 3 * D);
  std::vector<T> par(std::max<int64_t>(N, 1) * prs);
  for (auto& v : par) v = Tr::from(0.5 * nd(rng));
  const int64_t p_rs = c.rs_mult == 0 ? 0 : prs;  // stride 0: every n reads row 0
  auto P = [&](int64_t n, int k, int64_t i) { return Tr::to(par[(p_rs ? n : 0) * prs + k * D + i]); };

  // ---- kernel
  std::vector<T> xn(rows * D), h(rows * D), dx(rows * D), dy(rows * D), dg(N * D), ds(N * D), dc(N * D);
  std::vector<A> mean(rows), rstd(rows);
  const T* gate = par.data();
  const T* shift = par.data() + D;
  const T* scale = par.data() + 2 * D;
  auto fwd = [&](const T* xin, T* xout, T* hout, int threads) {
    return cpu::gated_residual_ln_modulate_fwd(Tr::dtype, xin, y.data(), gate, p_rs, shift, p_rs,
                                               scale, p_rs, xout, hout, mean.data(), rstd.data(), N,
                                               Tn, D, eps, threads);
  };
  auto bwd = [&](const T* dx_new, T* odx, T* ody, T* odg, T* ods, T* odc, int threads) {
    return cpu::gated_residual_ln_modulate_bwd(Tr::dtype, dx_new, dh.data(), xn.data(), y.data(),
                                               gate, p_rs, scale, p_rs, mean.data(), rstd.data(),
                                               odx, ody, odg, ods, odc, N, Tn, D, threads);
  };
  CHECK(fwd(x.data(), xn.data(), h.data(), 1) == Status::kOk, "fwd status");
  CHECK(bwd(dxn.data(), dx.data(), dy.data(), dg.data(), ds.data(), dc.data(), 1) == Status::kOk,
        "bwd status");

  // ---- reference (double)
  std::vector<double> r_xn(rows * D), r_h(rows * D), r_mean(rows), r_rstd(rows), r_dx(rows * D),
      r_dy(rows * D), r_dg(N * D, 0), r_ds(N * D, 0), r_dc(N * D, 0);
  std::vector<double> xnd = as_double(xn);  // LN input: x_new as stored
  double dx_scale = 1e-30;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < Tn; ++t) {
      const int64_t row = n * Tn + t;
      const double* r = &xnd[row * D];
      for (int64_t i = 0; i < D; ++i)
        r_xn[row * D + i] = Tr::to(x[row * D + i]) + P(n, 0, i) * Tr::to(y[row * D + i]);
      const auto [m, rs_] = row_stats(r, D, eps);
      r_mean[row] = m, r_rstd[row] = rs_;
      double sg = 0, sgx = 0;
      for (int64_t i = 0; i < D; ++i) {
        const double xh = (r[i] - m) * rs_, a = 1.0 + P(n, 2, i), dhv = Tr::to(dh[row * D + i]);
        r_h[row * D + i] = xh * a + P(n, 1, i);
        sg += dhv * a, sgx += dhv * a * xh;
        r_ds[n * D + i] += dhv;
        r_dc[n * D + i] += dhv * xh;
      }
      for (int64_t i = 0; i < D; ++i) {
        const double xh = (r[i] - m) * rs_, g = Tr::to(dh[row * D + i]) * (1.0 + P(n, 2, i));
        const double dr = Tr::to(dxn[row * D + i]) + rs_ * (g - sg / D - xh * sgx / D);
        r_dx[row * D + i] = dr;
        r_dy[row * D + i] = P(n, 0, i) * dr;
        r_dg[n * D + i] += dr * Tr::to(y[row * D + i]);
        dx_scale = std::max(dx_scale, std::fabs(rs_ * g) + std::fabs(Tr::to(dxn[row * D + i])));
      }
    }
  const char* isa = cpu::isa_name(cpu::active_isa());
#define EXPECT_ERR(e, tol, what)                                                               \
  CHECK((e) <= (tol), "%s %s N=%lld T=%lld D=%lld rs=%lld: %s rel err %.3g > %.3g", tname, isa, \
        (long long)N, (long long)Tn, (long long)D, (long long)c.rs_mult, what, (e), (tol))
  EXPECT_ERR(rel_err(xnd, r_xn), fwd_tol / 2, "x_new");
  EXPECT_ERR(rel_err(as_double(h), r_h), fwd_tol, "h");
  std::vector<double> md(mean.begin(), mean.end()), rd(rstd.begin(), rstd.end());
  EXPECT_ERR(rel_err(md, r_mean), fwd_tol, "mean");
  EXPECT_ERR(rel_err(rd, r_rstd), fwd_tol, "rstd");
  EXPECT_ERR(rel_err(as_double(dx), r_dx, dx_scale), bwd_tol, "dx");
  EXPECT_ERR(rel_err(as_double(dy), r_dy, dx_scale), bwd_tol, "dy");
  EXPECT_ERR(rel_err(as_double(dg), r_dg), bwd_tol, "dgate");
  EXPECT_ERR(rel_err(as_double(ds), r_ds), bwd_tol, "dshift");
  EXPECT_ERR(rel_err(as_double(dc), r_dc), bwd_tol, "dscale");

  // dx_new absent == dx_new of zeros
  {
    std::vector<T> zeros(rows * D, Tr::from(0.0)), a1(rows * D), a2(rows * D), b1(rows * D),
        b2(rows * D), g1(N * D), g2(N * D), s1(N * D), s2(N * D), c1(N * D), c2(N * D);
    bwd(nullptr, a1.data(), b1.data(), g1.data(), s1.data(), c1.data(), 1);
    bwd(zeros.data(), a2.data(), b2.data(), g2.data(), s2.data(), c2.data(), 1);
    CHECK(same_bits(a1, a2) && same_bits(b1, b2) && same_bits(g1, g2) && same_bits(s1, s2) &&
              same_bits(c1, c2),
          "%s %s: null dx_new differs from zeros", tname, isa);
  }
  // thread-count independence and in-place x_new (x_new == x)
  for (int threads : {2, 3}) {
    std::vector<T> xin = x, h2(rows * D), dx2(rows * D), dy2(rows * D), dg2(N * D), ds2(N * D),
                   dc2(N * D);
    std::vector<A> m0 = mean, r0 = rstd;
    fwd(xin.data(), xin.data(), h2.data(), threads);
    CHECK(same_bits(xin, xn) && same_bits(h2, h) && same_bits(m0, mean) && same_bits(r0, rstd),
          "%s %s: forward differs in place / with %d threads", tname, isa, threads);
    bwd(dxn.data(), dx2.data(), dy2.data(), dg2.data(), ds2.data(), dc2.data(), threads);
    CHECK(same_bits(dx2, dx) && same_bits(dy2, dy) && same_bits(dg2, dg) && same_bits(ds2, ds) &&
              same_bits(dc2, dc),
          "%s %s: backward differs with %d threads", tname, isa, threads);
  }

  // ---- plain gated residual: out = x + gate * y; dy = gate * dout, dgate = sum_T dout * y
  {
    std::vector<T> out(rows * D), pdy(rows * D), pdg(N * D);
    CHECK(cpu::gated_residual_fwd(Tr::dtype, x.data(), y.data(), gate, p_rs, out.data(), N, Tn, D,
                                  1) == Status::kOk,
          "plain fwd status");
    CHECK(same_bits(out, xn), "%s %s: plain forward differs from the fused x_new", tname, isa);
    CHECK(cpu::gated_residual_bwd(Tr::dtype, dh.data(), y.data(), gate, p_rs, pdy.data(),
                                  pdg.data(), N, Tn, D, 1) == Status::kOk,
          "plain bwd status");
    std::vector<double> w_dy(rows * D), w_dg(N * D, 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = 0; t < Tn; ++t)
        for (int64_t i = 0; i < D; ++i) {
          const int64_t k = (n * Tn + t) * D + i;
          w_dy[k] = P(n, 0, i) * Tr::to(dh[k]);
          w_dg[n * D + i] += Tr::to(dh[k]) * Tr::to(y[k]);
        }
    EXPECT_ERR(rel_err(as_double(pdy), w_dy), fwd_tol, "plain dy");
    EXPECT_ERR(rel_err(as_double(pdg), w_dg), bwd_tol, "plain dgate");
    std::vector<T> pdg3(N * D), pdy3(rows * D);
    cpu::gated_residual_bwd(Tr::dtype, dh.data(), y.data(), gate, p_rs, pdy3.data(), pdg3.data(), N,
                            Tn, D, 3);
    CHECK(same_bits(pdg3, pdg) && same_bits(pdy3, pdy), "%s %s: plain bwd depends on threads",
          tname, isa);
  }
#undef EXPECT_ERR
}

int main() {
  const Case cases[] = {
      {1, 1, 1, 3},    {1, 1, 72, 3},    {3, 7, 72, 6},    {1, 257, 72, 3}, {2, 3, 1000, 6},
      {3, 7, 1152, 6}, {1, 257, 1152, 3}, {3, 1, 1152, 0}, {70, 2, 33, 6},  {2, 0, 16, 3},
      {0, 4, 16, 3},   {4, 9, 17, 0},
  };
  for_each_isa([&](cpu::Isa) {
    uint32_t seed = 1;
    for (const Case& c : cases) {
      for_each_storage([&](auto t) { test_case<decltype(t)>(c, seed); });
      ++seed;
    }
  });
  float buf[8] = {0};
  CHECK(cpu::gated_residual_ln_modulate_fwd(DType::kFloat16, buf, buf, buf, 1, buf, 1, buf, 1, buf,
                                            buf, buf, buf, 1, 1, 1, 1e-6) ==
            Status::kUnsupportedDType,
        "float16 must be rejected on CPU");
  CHECK(cpu::gated_residual_ln_modulate_fwd(DType::kFloat32, buf, buf, buf, 1, buf, 1, buf, 1, buf,
                                            buf, buf, buf, 1, 1, 1, -1.0) ==
            Status::kInvalidArgument,
        "negative eps must be rejected");
  CHECK(cpu::gated_residual_fwd(DType::kFloat32, buf, buf, buf, -1, buf, 1, 1, 1) ==
            Status::kInvalidArgument,
        "negative stride must be rejected");
  CHECK(cpu::gated_residual_bwd(DType::kFloat16, buf, buf, buf, 1, buf, buf, 1, 1, 1) ==
            Status::kUnsupportedDType,
        "float16 must be rejected on CPU (plain bwd)");
  return dit_test::finish("test_gated_residual_cpu");
}
