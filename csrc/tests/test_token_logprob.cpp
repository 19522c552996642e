// Standalone tests of the token_logprob CPU kernels against a naive float64 implementation:
// every dtype, odd shapes (V = 1, V not a multiple of 8, V across the 1024-wide block),
// -inf logits, a row max rising block after block, vocab-split partials, backward (also in
// place), dtype conversions, exp_fast, and the argument errors; the kernel checks run once per
// SIMD level this CPU has (OPENR1_MEGA_CPU_ISA = baseline, avx2, avx512).
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cpu_isa.h"
#include "token_logprob.h"

using namespace openr1_mega;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Naive {
  double logp, lse, entropy;
};

// Float64 reference of one row of already-converted logits.
Naive naive_row(const std::vector<double>& z, int64_t y) {
  double m = -kInf;
  for (double v : z) m = std::max(m, v);
  double s = 0.0;
  for (double v : z) s += std::exp(v - m);
  const double lse = m + std::log(s);
  double ent = 0.0;
  for (double v : z) {
    const double p = std::exp(v - lse);
    ent -= p > 0.0 ? p * (v - lse) : 0.0;
  }
  return {z[y] - lse, lse, ent};
}

template <typename T>
std::vector<T> random_logits(int64_t n, int64_t v, uint32_t seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, static_cast<float>(scale));
  std::vector<T> out(n * v);
  for (auto& x : out) x = from_float<T>(dist(gen));
  return out;
}

template <>
std::vector<double> random_logits<double>(int64_t n, int64_t v, uint32_t seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> out(n * v);
  for (auto& x : out) x = dist(gen);
  return out;
}

template <typename T>
std::vector<double> row_as_double(const std::vector<T>& x, int64_t r, int64_t v, double inv_t) {
  std::vector<double> z(v);
  for (int64_t i = 0; i < v; ++i) z[i] = static_cast<double>(to_float(x[r * v + i])) * inv_t;
  return z;
}

std::vector<int64_t> targets_for(int64_t n, int64_t v) {
  std::vector<int64_t> t(n);
  for (int64_t r = 0; r < n; ++r) t[r] = (r * 7919 + 3) % v;
  return t;
}

template <typename T>
void check_forward(int64_t n, int64_t v, double temperature, double tol) {
  using A = acc_t<T>;
  auto x = random_logits<T>(n, v, static_cast<uint32_t>(n * 31 + v), 3.0);
  auto t = targets_for(n, v);
  std::vector<A> logp(n), lse(n), ent(n);
  token_logprob_forward(x.data(), {n, v, v}, t.data(), temperature, logp.data(), lse.data(),
                        ent.data(), 2);
  for (int64_t r = 0; r < n; ++r) {
    const Naive want = naive_row(row_as_double(x, r, v, 1.0 / temperature), t[r]);
    CHECK_CLOSE(logp[r], want.logp, tol, tol);
    CHECK_CLOSE(lse[r], want.lse, tol, tol);
    CHECK_CLOSE(ent[r], want.entropy, tol, tol);
  }
}

// Two vocab shards combined as the vocab-parallel op does must equal the unsplit forward.
void check_partials_combine(int64_t n, int64_t v, int64_t split) {
  auto x = random_logits<float>(n, v, 7, 2.0);
  auto t = targets_for(n, v);
  std::vector<float> m[2], s[2], w[2], tz[2];
  for (int k = 0; k < 2; ++k) {
    m[k].resize(n), s[k].resize(n), w[k].resize(n), tz[k].resize(n);
    const int64_t start = k == 0 ? 0 : split;
    const int64_t cols = k == 0 ? split : v - split;
    token_logprob_partials(x.data() + start, {n, cols, v}, t.data(), start, 1.0,
                           LogprobPartials<float>{m[k].data(), s[k].data(), w[k].data(),
                                                  tz[k].data()},
                           1);
  }
  for (int64_t r = 0; r < n; ++r) {
    const double mx = std::max(m[0][r], m[1][r]);
    double sum = 0.0, wsum = 0.0;
    for (int k = 0; k < 2; ++k) {
      const double scale = std::exp(m[k][r] - mx);
      sum += s[k][r] * scale;
      wsum += scale * (w[k][r] + (m[k][r] - mx) * s[k][r]);
    }
    const Naive want = naive_row(row_as_double(x, r, v, 1.0), t[r]);
    CHECK_CLOSE(tz[0][r] + tz[1][r] - (mx + std::log(sum)), want.logp, 1e-5, 1e-5);
    CHECK_CLOSE(std::log(sum) - wsum / sum, want.entropy, 1e-5, 1e-5);
  }
}

// grad = (a [v == y] + p (b + c log p)) / T against float64, out of place and in place.
template <typename T>
void check_backward(int64_t n, int64_t v, double temperature, double tol) {
  using A = acc_t<T>;
  auto x = random_logits<T>(n, v, 11, 2.0);
  auto t = targets_for(n, v);
  std::vector<A> logp(n), lse(n), a(n), b(n), c(n);
  token_logprob_forward(x.data(), {n, v, v}, t.data(), temperature, logp.data(), lse.data(),
                        nullptr, 1);
  for (int64_t r = 0; r < n; ++r) a[r] = A(0.5 + r), b[r] = A(-0.25 * r), c[r] = A(0.1);
  std::vector<T> grad(n * v);
  const LogprobGradCoefs<A> coefs{a.data(), b.data(), c.data()};
  token_logprob_backward(x.data(), {n, v, v}, t.data(), 0, temperature, lse.data(), coefs,
                         grad.data(), v, 2);
  std::vector<T> inplace = x;
  token_logprob_backward(inplace.data(), {n, v, v}, t.data(), 0, temperature, lse.data(),
                         coefs, inplace.data(), v, 2);
  for (int64_t r = 0; r < n; ++r) {
    const auto z = row_as_double(x, r, v, 1.0 / temperature);
    const double row_lse = naive_row(z, t[r]).lse;
    for (int64_t i = 0; i < v; ++i) {
      const double lp = z[i] - row_lse;
      const double p = std::exp(lp);
      const double want = ((i == t[r] ? a[r] : 0.0) + p * (b[r] + c[r] * lp)) / temperature;
      CHECK_CLOSE(to_float(grad[r * v + i]), want, tol, tol);
      CHECK(to_float(inplace[r * v + i]) == to_float(grad[r * v + i]));
    }
  }
}

void check_neg_inf() {
  const int64_t v = 1500;
  std::vector<float> x(2 * v, 0.5f);
  for (int64_t i = 0; i < 1200; ++i) x[i] = -INFINITY;  // first block of row 0 all -inf
  for (int64_t i = 0; i < v; ++i) x[v + i] = -INFINITY;  // row 1 entirely -inf
  std::vector<int64_t> t{1300, 3};
  std::vector<float> logp(2), lse(2), ent(2);
  token_logprob_forward(x.data(), {2, v, v}, t.data(), 1.0, logp.data(), lse.data(),
                        ent.data(), 1);
  CHECK_CLOSE(logp[0], -std::log(300.0), 1e-6, 1e-6);
  CHECK_CLOSE(ent[0], std::log(300.0), 1e-6, 1e-6);
  CHECK(std::isnan(logp[1]) && std::isnan(ent[1]));  // as torch.log_softmax of all -inf
  t[0] = 5;  // target at -inf
  token_logprob_forward(x.data(), {1, v, v}, t.data(), 1.0, logp.data(), lse.data(),
                        ent.data(), 1);
  CHECK(logp[0] == -INFINITY);
  CHECK_CLOSE(ent[0], std::log(300.0), 1e-6, 1e-6);
  std::vector<float> a{1.0f}, b{-1.0f}, c{-1.0f}, grad(v);
  token_logprob_backward(x.data(), {1, v, v}, t.data(), 0, 1.0, lse.data(), {a.data(), b.data(),
                         c.data()}, grad.data(), v, 1);
  CHECK(grad[5] == 1.0f);
  CHECK(grad[0] == 0.0f);
  CHECK(std::isfinite(grad[1300]));
}

// Logits that grow by 40 per block of 1024 (a term of exp(80) and more over the first block's
// max), then fall: the kernels must move their sums to each new max without overflow.
void check_rising_max() {
  const int64_t v = 9000;
  std::vector<float> x(v);
  for (int64_t i = 0; i < v; ++i) x[i] = i < 6000 ? 40.0f * (i / 1024) + 0.001f * (i % 97) : -3.0f;
  x[4500] = 300.0f;
  std::vector<int64_t> t{4500};
  std::vector<float> logp(1), lse(1), ent(1);
  token_logprob_forward(x.data(), {1, v, v}, t.data(), 1.0, logp.data(), lse.data(), ent.data(),
                        1);
  std::vector<double> z(x.begin(), x.end());
  const Naive want = naive_row(z, 4500);
  CHECK_CLOSE(lse[0], want.lse, 1e-6, 1e-6);
  CHECK_CLOSE(logp[0], want.logp, 1e-6, 1e-6);
  CHECK_CLOSE(ent[0], want.entropy, 1e-5, 1e-6);
  x[4500] = 0.0f;  // the max now sits in the last rising block
  token_logprob_forward(x.data(), {1, v, v}, t.data(), 0.5, logp.data(), lse.data(), ent.data(),
                        1);
  for (auto& e : z) e = 0.0;
  for (int64_t i = 0; i < v; ++i) z[i] = static_cast<double>(x[i]) / 0.5;
  const Naive cooled = naive_row(z, 4500);
  CHECK_CLOSE(lse[0], cooled.lse, 1e-6, 1e-6);
  CHECK_CLOSE(logp[0], cooled.logp, 1e-6, 1e-6);
  CHECK_CLOSE(ent[0], cooled.entropy, 1e-5, 1e-6);
}

// One large logit at T = 3: z = x / T is rounded once, for the max as for the target, so
// logp is exactly 0 (found by tests/test_fuzz.py: an unrounded z - max gave -2.5e-5).
void check_single_scaled_logit() {
  std::vector<float> x{1000.0f, 1000.0f, 999.9f};
  std::vector<int64_t> t{0};
  std::vector<float> logp(1), lse(1), ent(1);
  token_logprob_forward(x.data(), {1, 1, 1}, t.data(), 3.0, logp.data(), lse.data(), ent.data(),
                        1);
  CHECK(logp[0] == 0.0f && ent[0] == 0.0f);
  token_logprob_forward(x.data(), {1, 2, 2}, t.data(), 3.0, logp.data(), lse.data(), ent.data(),
                        1);
  CHECK_CLOSE(logp[0], -std::log(2.0), 1e-6, 1e-6);
}

void check_conversions() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const fp16_t x{static_cast<uint16_t>(h)};
    const float f = to_float(x);
    if (!std::isnan(f)) CHECK(from_float<fp16_t>(f).bits == h);
    const bf16_t y{static_cast<uint16_t>(h)};
    const float g = to_float(y);
    if (!std::isnan(g)) CHECK(from_float<bf16_t>(g).bits == h);
  }
  CHECK(to_float(from_float<fp16_t>(65520.0f)) == INFINITY);  // rounds past the largest half
  CHECK(from_float<bf16_t>(1.0f + 0x1.0p-8f).bits == from_float<bf16_t>(1.0f).bits);  // ties even
  CHECK(std::isnan(to_float(from_float<bf16_t>(NAN))));
}

void check_exp_fast() {
  double worst = 0.0;
  for (double x = -87.0; x <= 0.0; x += 0.00731) {
    const double got = exp_fast(static_cast<float>(x));
    const double want = std::exp(static_cast<double>(static_cast<float>(x)));
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  CHECK(worst < 3e-7);
  CHECK(exp_fast(-100.0f) == 0.0f);
  CHECK(exp_fast(-INFINITY) == 0.0f);
  CHECK(std::isnan(exp_fast(NAN)));
}

void check_errors() {
  std::vector<float> x(6, 0.0f), out(2);
  std::vector<int64_t> t{0, 3};
  EXPECT_THROW_ARG(token_logprob_forward(x.data(), {2, 3, 3}, t.data(), 1.0, out.data(),
                                         out.data(), nullptr, 1),
                   "targets");
  t[1] = -1;
  EXPECT_THROW_ARG(token_logprob_partials(x.data(), {2, 3, 3}, t.data(), 0, 1.0,
                                          LogprobPartials<float>{out.data(), out.data(),
                                                                 nullptr, out.data()},
                                          1),
                   "targets");
  t[1] = 1;
  EXPECT_THROW_ARG(token_logprob_forward(x.data(), {2, 3, 3}, t.data(), 0.0, out.data(),
                                         out.data(), nullptr, 1),
                   "temperature");
  EXPECT_THROW_ARG(token_logprob_forward(x.data(), {2, 0, 3}, t.data(), 1.0, out.data(),
                                         out.data(), nullptr, 1),
                   "logits");
}

void check_kernels() {
  for (int64_t v : {1, 7, 8, 1023, 1500, 4099}) {
    check_forward<float>(5, v, 1.0, 1e-5);
    check_forward<double>(3, v, 0.7, 1e-12);
  }
  check_forward<float>(1, 2500, 0.6, 1e-5);
  check_forward<bf16_t>(9, 3001, 1.3, 1e-5);  // exact on the bf16 values: only fp32 sums
  check_forward<fp16_t>(4, 2049, 1.0, 1e-5);
  check_forward<fp16_t>(2, 21, 0.9, 1e-5);
  check_forward<float>(0, 5, 1.0, 1e-5);
  check_partials_combine(6, 3000, 1111);
  check_partials_combine(3, 9, 4);
  check_backward<float>(4, 1500, 0.8, 1e-5);
  check_backward<double>(3, 77, 1.0, 1e-12);
  check_backward<bf16_t>(3, 1031, 1.0, 8e-3);  // one bf16 rounding of the result
  check_backward<fp16_t>(2, 333, 1.0, 1e-3);
  check_neg_inf();
  check_rising_max();
  check_single_scaled_logit();
}

}  // namespace

int main() {
  const CpuIsa best = detected_cpu_isa();
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) {
      std::printf("test_token_logprob: %s not supported here, skipped\n", cpu_isa_name(isa));
      continue;
    }
    setenv("OPENR1_MEGA_CPU_ISA", cpu_isa_name(isa), 1);
    CHECK(active_cpu_isa() == isa);
    check_kernels();
  }
  setenv("OPENR1_MEGA_CPU_ISA", "sse9", 1);
  EXPECT_THROW_ARG(active_cpu_isa(), "OPENR1_MEGA_CPU_ISA");
  unsetenv("OPENR1_MEGA_CPU_ISA");
  CHECK(active_cpu_isa() == best);
  check_conversions();
  check_exp_fast();
  check_errors();
  return check::finish("test_token_logprob");
}
