// Standalone tests of the grpo_advantage CPU kernel against a naive float64 implementation:
// every scale, biased and unbiased std, fixed and variable group sizes (explicit index in
// any order), G = 1, zero-std group counting, the per-token output and the argument errors.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "grpo_advantage.h"

using namespace openr1_mega;

namespace {

struct Expected {
  std::vector<double> adv, mean, sd;
  int64_t zero_std;
};

double naive_std(const std::vector<double>& r, bool unbiased) {
  const int64_t n = static_cast<int64_t>(r.size());
  if (n <= 1) return 0.0;
  double mean = 0.0;
  for (double x : r) mean += x / n;
  double m2 = 0.0;
  for (double x : r) m2 += (x - mean) * (x - mean);
  return std::sqrt(m2 / (unbiased ? n - 1 : n));
}

Expected naive(const std::vector<double>& r, const std::vector<int64_t>& index, int64_t k,
               AdvantageOptions o) {
  Expected e{std::vector<double>(r.size()), std::vector<double>(k), std::vector<double>(k), 0};
  const double batch_sd = naive_std(r, o.unbiased);
  for (int64_t g = 0; g < k; ++g) {
    std::vector<double> members;
    for (size_t i = 0; i < r.size(); ++i)
      if (index[i] == g) members.push_back(r[i]);
    double mean = 0.0;
    for (double x : members) mean += x / members.size();
    const double sd = naive_std(members, o.unbiased);
    e.mean[g] = mean;
    e.sd[g] = sd;
    bool equal = !members.empty();
    for (double x : members) equal = equal && x == members[0];
    e.zero_std += equal ? 1 : 0;
    const double denom = o.scale == AdvantageScale::kGroup   ? sd + o.eps
                         : o.scale == AdvantageScale::kBatch ? batch_sd + o.eps
                                                             : 1.0;
    for (size_t i = 0; i < r.size(); ++i)
      if (index[i] == g) e.adv[i] = (r[i] - mean) / denom;
  }
  return e;
}

// Rewards in {0, 0.5, 1} so that some groups are all equal.
std::vector<float> rewards_for(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(0, 2);
  std::vector<float> r(n);
  for (auto& x : r) x = 0.5f * d(gen);
  return r;
}

void compare(const AdvantageOutputs<float>& out, const Expected& e, int64_t n, int64_t k) {
  for (int64_t i = 0; i < n; ++i) CHECK_CLOSE(out.advantages[i], e.adv[i], 1e-5, 1e-6);
  for (int64_t g = 0; g < k; ++g) {
    CHECK_CLOSE(out.group_mean[g], e.mean[g], 1e-6, 1e-7);
    CHECK_CLOSE(out.group_std[g], e.sd[g], 1e-6, 1e-7);
  }
  CHECK(*out.num_zero_std == e.zero_std);
}

void check_contiguous(int64_t k, int64_t g, AdvantageOptions o) {
  const int64_t n = k * g;
  auto r = rewards_for(n, static_cast<uint32_t>(k * 13 + g));
  std::vector<int64_t> index(n);
  for (int64_t i = 0; i < n; ++i) index[i] = i / g;
  std::vector<float> adv(n), mean(k), sd(k);
  int64_t zero = -1;
  const AdvantageOutputs<float> out{adv.data(), nullptr, mean.data(), sd.data(), &zero};
  grpo_advantage(r.data(), n, {nullptr, g, k}, {nullptr, nullptr, 0}, o, out, 2);
  compare(out, naive(std::vector<double>(r.begin(), r.end()), index, k, o), n, k);
  std::vector<float> adv2(n), mean2(k), sd2(k);
  int64_t zero2 = -1;
  grpo_advantage(r.data(), n, {index.data(), g, k}, {nullptr, nullptr, 0}, o,
                 AdvantageOutputs<float>{adv2.data(), nullptr, mean2.data(), sd2.data(), &zero2},
                 2);
  for (int64_t i = 0; i < n; ++i) CHECK_CLOSE(adv2[i], adv[i], 1e-6, 1e-7);
  CHECK(zero2 == zero);
}

// Variable group sizes, members interleaved, one empty group (not counted as zero-std).
void check_indexed(AdvantageOptions o) {
  const std::vector<int64_t> index{2, 0, 2, 1, 0, 2, 2, 4, 0, 1, 2};
  const int64_t n = static_cast<int64_t>(index.size()), k = 5;
  auto r = rewards_for(n, 3);
  r[3] = r[9] = 1.0f;  // group 1: all equal; group 4: singleton
  std::vector<float> adv(n), mean(k), sd(k);
  int64_t zero = -1;
  const AdvantageOutputs<float> out{adv.data(), nullptr, mean.data(), sd.data(), &zero};
  grpo_advantage(r.data(), n, {index.data(), 0, k}, {nullptr, nullptr, 0}, o, out, 1);
  compare(out, naive(std::vector<double>(r.begin(), r.end()), index, k, o), n, k);
}

void check_tokens() {
  const std::vector<double> r{1.0, 0.0, 0.5, 0.5};
  const std::vector<int64_t> tok_index{0, 0, 1, -1, 3, 2, 2};
  const bool mask[] = {true, false, true, false, true, true, true};
  std::vector<double> adv(4), tok(7), mean(2), sd(2);
  int64_t zero = 0;
  grpo_advantage(r.data(), 4, {nullptr, 2, 2}, {tok_index.data(), mask, 7},
                 {AdvantageScale::kNone, 0.0, true},
                 AdvantageOutputs<double>{adv.data(), tok.data(), mean.data(), sd.data(), &zero},
                 1);
  const std::vector<double> want{0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0};
  for (int t = 0; t < 7; ++t) CHECK_CLOSE(tok[t], want[t], 0.0, 1e-15);
  CHECK(zero == 1);
}

void check_errors() {
  std::vector<float> r(6, 1.0f), adv(6), m(3), s(3), tok(2);
  int64_t z = 0;
  const AdvantageOutputs<float> out{adv.data(), tok.data(), m.data(), s.data(), &z};
  const AdvantageOptions o{AdvantageScale::kGroup, 1e-6, true};
  EXPECT_THROW_ARG(grpo_advantage(r.data(), 6, {nullptr, 4, 1}, {nullptr, nullptr, 0}, o, out, 1),
                   "group_size");
  const std::vector<int64_t> bad{0, 1, 2, 3, 0, 1};
  EXPECT_THROW_ARG(grpo_advantage(r.data(), 6, {bad.data(), 0, 3}, {nullptr, nullptr, 0}, o, out,
                                  1),
                   "group_index");
  const std::vector<int64_t> tok_index{0, 6};
  const bool mask[] = {true, true};
  EXPECT_THROW_ARG(grpo_advantage(r.data(), 6, {nullptr, 2, 3}, {tok_index.data(), mask, 2}, o,
                                  out, 1),
                   "token_index");
  EXPECT_THROW_ARG(parse_advantage_scale("std"), "scale");
  EXPECT_THROW_ARG(grpo_advantage(r.data(), 6, {nullptr, 2, 3}, {nullptr, nullptr, 0},
                                  {AdvantageScale::kGroup, -1.0, true}, out, 1),
                   "eps");
}

}  // namespace

int main() {
  for (auto scale : {AdvantageScale::kGroup, AdvantageScale::kBatch, AdvantageScale::kNone}) {
    for (bool unbiased : {true, false}) {
      const AdvantageOptions o{scale, 1e-6, unbiased};
      check_contiguous(37, 16, o);
      check_contiguous(5, 1, o);
      check_contiguous(1, 1000, o);
      check_contiguous(3, 7, o);
      check_indexed(o);
    }
  }
  check_contiguous(0, 4, {AdvantageScale::kGroup, 1e-6, true});
  check_tokens();
  check_errors();
  return check::finish("test_grpo_advantage");
}
