// CPU ln_modulate kernels vs a naive double-precision reference: forward (y, mean, rstd) and
// backward (dx, dshift, dscale), for fp32 / fp64 / bf16, every compiled ISA path, strided
// shift/scale rows, edge shapes, and thread-count independence (bitwise).
#include "cpu/ln_modulate.h"
#include "tests/check.h"

using namespace dit_fast;
using namespace dit_test;

struct Case {
  int64_t N, T, D, stride_mult;  // shift/scale row stride = stride_mult * D
};

template <typename T>
struct Data {
  int64_t N, T_, D, srs;
  std::vector<T> x, dy, mod;  // mod: (N, srs) holding shift at column 0 and scale at column D
  std::vector<double> xd, dyd, shiftd, scaled;  // exact values of the stored inputs
};

template <typename T>
Data<T> make_data(const Case& c, uint32_t seed) {
  using Tr = Storage<T>;
  Data<T> d;
  d.N = c.N, d.T_ = c.T, d.D = c.D;
  d.srs = std::max<int64_t>(c.stride_mult * c.D, 2 * c.D);
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t rows = c.N * c.T;
  d.x.resize(rows * c.D), d.dy.resize(rows * c.D), d.mod.resize(c.N * d.srs);
  for (int64_t r = 0; r < rows; ++r) {
    const double off = 3.0 * nd(rng), sc = std::exp(nd(rng));  // non-trivial mean and scale
    for (int64_t i = 0; i < c.D; ++i) d.x[r * c.D + i] = Tr::from(off + sc * nd(rng));
  }
  for (auto& v : d.dy) v = Tr::from(nd(rng));
  for (auto& v : d.mod) v = Tr::from(0.5 * nd(rng));
  for (auto& v : d.x) d.xd.push_back(Tr::to(v));
  for (auto& v : d.dy) d.dyd.push_back(Tr::to(v));
  d.shiftd.resize(c.N * c.D), d.scaled.resize(c.N * c.D);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t i = 0; i < c.D; ++i) {
      d.shiftd[n * c.D + i] = Tr::to(d.mod[n * d.srs + i]);
      d.scaled[n * c.D + i] = Tr::to(d.mod[n * d.srs + c.D + i]);
    }
  return d;
}

struct Ref {
  std::vector<double> y, mean, rstd, dx, dshift, dscale;
  double dx_scale = 0;  // max |rstd * g|: the natural magnitude of dx (dx itself can be ~0, D=1)
};

Ref reference(int64_t N, int64_t T, int64_t D, const std::vector<double>& x,
              const std::vector<double>& dy, const std::vector<double>& shift,
              const std::vector<double>& scale, double eps) {
  Ref r;
  r.y.assign(N * T * D, 0), r.dx.assign(N * T * D, 0), r.mean.assign(N * T, 0),
      r.rstd.assign(N * T, 0), r.dshift.assign(N * D, 0), r.dscale.assign(N * D, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = n * T + t;
      const double* xr = &x[row * D];
      const double* dyr = &dy[row * D];
      const auto [m, rs] = row_stats(xr, D, eps);
      r.mean[row] = m, r.rstd[row] = rs;
      double sg = 0, sgx = 0;
      for (int64_t i = 0; i < D; ++i) {
        const double xh = (xr[i] - m) * rs, a = 1.0 + scale[n * D + i];
        r.y[row * D + i] = xh * a + shift[n * D + i];
        sg += dyr[i] * a, sgx += dyr[i] * a * xh;
        r.dshift[n * D + i] += dyr[i];
        r.dscale[n * D + i] += dyr[i] * xh;
      }
      for (int64_t i = 0; i < D; ++i) {
        const double xh = (xr[i] - m) * rs, g = dyr[i] * (1.0 + scale[n * D + i]);
        r.dx[row * D + i] = rs * (g - sg / D - xh * sgx / D);
        r.dx_scale = std::max(r.dx_scale, std::fabs(rs * g));
      }
    }
  return r;
}

template <typename T>
struct Out {
  using A = typename Storage<T>::A;
  std::vector<T> y, dx, dshift, dscale;
  std::vector<A> mean, rstd;
};

template <typename T>
Out<T> run(const Data<T>& d, double eps, int threads) {
  const int64_t N = d.N, Tn = d.T_, D = d.D;
  Out<T> o;
  o.y.resize(N * Tn * D), o.dx.resize(N * Tn * D), o.dshift.resize(N * D), o.dscale.resize(N * D);
  o.mean.resize(N * Tn), o.rstd.resize(N * Tn);
  const T* shift = d.mod.data();
  const T* scale = d.mod.data() + D;
  Status s = cpu::ln_modulate_fwd(Storage<T>::dtype, d.x.data(), shift, d.srs, scale, d.srs,
                                  o.y.data(), o.mean.data(), o.rstd.data(), N, Tn, D, eps, threads);
  CHECK(s == Status::kOk, "fwd status %s", status_name(s));
  s = cpu::ln_modulate_bwd(Storage<T>::dtype, d.dy.data(), d.x.data(), scale, d.srs, o.mean.data(),
                           o.rstd.data(), o.dx.data(), o.dshift.data(), o.dscale.data(), N, Tn, D,
                           threads);
  CHECK(s == Status::kOk, "bwd status %s", status_name(s));
  return o;
}

template <typename T>
void test_case(const Case& c, uint32_t seed) {
  using Tr = Storage<T>;
  // relative to the row / tensor scale
  const double fwd_tol = per_storage<T>(1e-5, 1e-12, 1.0 / 256),
               bwd_tol = per_storage<T>(2e-5, 1e-11, 1.0 / 128);
  const double eps = 1e-6;
  Data<T> d = make_data<T>(c, seed);
  Ref r = reference(c.N, c.T, c.D, d.xd, d.dyd, d.shiftd, d.scaled, eps);
  Out<T> o = run(d, eps, 1);
  const double e_y = rel_err(as_double(o.y), r.y), e_m = rel_err(as_double(o.mean), r.mean),
               e_r = rel_err(as_double(o.rstd), r.rstd),
               e_dx = rel_err(as_double(o.dx), r.dx, r.dx_scale),
               e_ds = rel_err(as_double(o.dshift), r.dshift), e_dc = rel_err(as_double(o.dscale), r.dscale);
  const char* tname = dtype_name(Tr::dtype);
  const char* isa = cpu::isa_name(cpu::active_isa());
#define EXPECT_ERR(e, tol, what)                                                              \
  CHECK((e) <= (tol), "%s %s N=%lld T=%lld D=%lld stride=%lld: %s rel err %.3g > %.3g", tname, \
        isa, (long long)c.N, (long long)c.T, (long long)c.D, (long long)c.stride_mult, what,   \
        (e), (tol))
  EXPECT_ERR(e_y, fwd_tol, "y");
  EXPECT_ERR(e_m, fwd_tol, "mean");
  EXPECT_ERR(e_r, fwd_tol, "rstd");
  EXPECT_ERR(e_dx, bwd_tol, "dx");
  EXPECT_ERR(e_ds, bwd_tol, "dshift");
  EXPECT_ERR(e_dc, bwd_tol, "dscale");
#undef EXPECT_ERR
  // Thread-count independence: bitwise identical with 2 and 3 threads.
  for (int threads : {2, 3}) {
    Out<T> o2 = run(d, eps, threads);
    CHECK(same_bits(o.y, o2.y) && same_bits(o.dx, o2.dx) && same_bits(o.dshift, o2.dshift) &&
              same_bits(o.dscale, o2.dscale) && same_bits(o.mean, o2.mean) &&
              same_bits(o.rstd, o2.rstd),
          "%s %s N=%lld T=%lld D=%lld: results differ with %d threads", tname, isa,
          (long long)c.N, (long long)c.T, (long long)c.D, threads);
  }
}

int main() {
  const Case cases[] = {
      {1, 1, 1, 1},     {1, 1, 72, 1},   {3, 7, 72, 6},    {1, 257, 72, 1}, {2, 3, 1000, 2},
      {3, 7, 1152, 6},  {1, 257, 1152, 6}, {3, 1, 1152, 1}, {70, 2, 33, 6},  {2, 0, 16, 1},
      {0, 4, 16, 1},    {4, 9, 17, 1},
  };
  std::printf("openmp=%d default_threads=%d auto_isa=%s\n", (int)cpu::has_openmp(),
              cpu::default_num_threads(), cpu::isa_name(cpu::active_isa()));
  for_each_isa([&](cpu::Isa) {
    uint32_t seed = 1;
    for (const Case& c : cases) {
      for_each_storage([&](auto t) { test_case<decltype(t)>(c, seed); });
      ++seed;
    }
  });
  // Argument validation.
  float buf[4] = {0, 0, 0, 0};
  CHECK(cpu::ln_modulate_fwd(DType::kFloat16, buf, buf, 1, buf, 1, buf, buf, buf, 1, 1, 1, 1e-6) ==
            Status::kUnsupportedDType,
        "float16 must be rejected on CPU");
  CHECK(cpu::ln_modulate_fwd(DType::kFloat32, buf, buf, 1, buf, 1, buf, buf, buf, -1, 1, 1, 1e-6) ==
            Status::kInvalidArgument,
        "negative N must be rejected");
  CHECK(cpu::ln_modulate_fwd(DType::kFloat32, buf, buf, 1, buf, 1, buf, buf, buf, 1, 1, 1, -1.0) ==
            Status::kInvalidArgument,
        "negative eps must be rejected");
  // Zero variance row: y == shift exactly (xhat == 0), rstd == 1/sqrt(eps).
  {
    float x[4] = {2, 2, 2, 2}, sh[4] = {1, 2, 3, 4}, sc[4] = {5, 6, 7, 8}, y[4], m, rs;
    cpu::ln_modulate_fwd(DType::kFloat32, x, sh, 4, sc, 4, y, &m, &rs, 1, 1, 4, 1e-6);
    CHECK(y[0] == 1 && y[1] == 2 && y[2] == 3 && y[3] == 4 && m == 2, "constant row");
    CHECK(std::fabs(rs - 1000.0f) < 1e-2f, "rstd of constant row = %g", rs);
  }
  return dit_test::finish("test_ln_modulate_cpu");
}
