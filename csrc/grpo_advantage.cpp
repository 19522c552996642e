// CPU kernel for grpo_advantage (see grpo_advantage.h for the maths).
//
// Contiguous groups (fixed group size) run one group per loop iteration, in parallel: the
// group's rewards are read for the mean, again for the squared deviations and once more for
// the advantages, all from cache. Explicit group indices take a serial scatter pass for the
// per-group sums (variable sizes, any order), then a parallel pass for the advantages.
#include "grpo_advantage.h"

#include <cmath>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace openr1_mega {
namespace {

int threads_for(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  return num_threads > 0 ? num_threads : 1;
#endif
}

double std_from(double m2, int64_t count, bool unbiased) {
  const int64_t dof = unbiased ? count - 1 : count;
  return (count <= 1 || dof <= 0) ? 0.0 : std::sqrt(m2 / static_cast<double>(dof));
}

double denominator(AdvantageOptions options, double group_sd, double batch_sd) {
  switch (options.scale) {
    case AdvantageScale::kGroup:
      return group_sd + options.eps;
    case AdvantageScale::kBatch:
      return batch_sd + options.eps;
    case AdvantageScale::kNone:
      break;
  }
  return 1.0;
}

template <typename T>
double batch_std(const T* rewards, int64_t n, bool unbiased, int num_threads) {
  double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) num_threads(threads_for(num_threads))
  for (int64_t i = 0; i < n; ++i) {
    sum += rewards[i];
  }
  const double mean = n > 0 ? sum / static_cast<double>(n) : 0.0;
  double m2 = 0.0;
#pragma omp parallel for reduction(+ : m2) num_threads(threads_for(num_threads))
  for (int64_t i = 0; i < n; ++i) {
    const double d = rewards[i] - mean;
    m2 += d * d;
  }
  return std_from(m2, n, unbiased);
}

template <typename T>
void contiguous_groups(const T* rewards, int64_t group_size, int64_t num_groups,
                       AdvantageOptions options, double batch_sd,
                       const AdvantageOutputs<T>& out, int num_threads) {
  int64_t zero_std = 0;
#pragma omp parallel for schedule(static) reduction(+ : zero_std) \
    num_threads(threads_for(num_threads))
  for (int64_t g = 0; g < num_groups; ++g) {
    const T* r = rewards + g * group_size;
    double sum = 0.0;
    bool all_equal = true;
    for (int64_t i = 0; i < group_size; ++i) {
      sum += r[i];
      all_equal = all_equal && r[i] == r[0];
    }
    const double mean = sum / static_cast<double>(group_size);
    double m2 = 0.0;
    for (int64_t i = 0; i < group_size; ++i) {
      const double d = r[i] - mean;
      m2 += d * d;
    }
    const double sd = std_from(m2, group_size, options.unbiased);
    const double denom = denominator(options, sd, batch_sd);
    T* adv = out.advantages + g * group_size;
    for (int64_t i = 0; i < group_size; ++i) {
      adv[i] = static_cast<T>((r[i] - mean) / denom);
    }
    out.group_mean[g] = static_cast<T>(mean);
    out.group_std[g] = static_cast<T>(sd);
    zero_std += all_equal ? 1 : 0;
  }
  *out.num_zero_std = zero_std;
}

// Per-group sums over an explicit index: one serial scatter pass (checks the index too).
struct IndexedSums {
  std::vector<double> sum;
  std::vector<int64_t> count;
  std::vector<double> first;
  std::vector<char> differs;
};

template <typename T>
IndexedSums indexed_sums(const T* rewards, int64_t n, const int64_t* index, int64_t num_groups) {
  IndexedSums s{std::vector<double>(num_groups, 0.0), std::vector<int64_t>(num_groups, 0),
                std::vector<double>(num_groups, 0.0), std::vector<char>(num_groups, 0)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = index[i];
    check_arg(g >= 0 && g < num_groups, "group_index",
              "group index " + std::to_string(g) + " at position " + std::to_string(i) +
                  " is outside [0, " + std::to_string(num_groups) + ")");
    if (s.count[g] == 0) {
      s.first[g] = rewards[i];
    } else if (rewards[i] != s.first[g]) {
      s.differs[g] = 1;
    }
    s.sum[g] += rewards[i];
    s.count[g] += 1;
  }
  return s;
}

template <typename T>
void indexed_groups(const T* rewards, int64_t n, const int64_t* index, int64_t num_groups,
                    AdvantageOptions options, double batch_sd,
                    const AdvantageOutputs<T>& out, int num_threads) {
  IndexedSums s = indexed_sums(rewards, n, index, num_groups);
  std::vector<double> mean(num_groups, 0.0);
  for (int64_t g = 0; g < num_groups; ++g) {
    mean[g] = s.count[g] > 0 ? s.sum[g] / static_cast<double>(s.count[g]) : 0.0;
  }
  std::vector<double> m2(num_groups, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const double d = rewards[i] - mean[index[i]];
    m2[index[i]] += d * d;
  }
  std::vector<double> denom(num_groups, 1.0);
  int64_t zero_std = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const double sd = std_from(m2[g], s.count[g], options.unbiased);
    denom[g] = denominator(options, sd, batch_sd);
    out.group_mean[g] = static_cast<T>(mean[g]);
    out.group_std[g] = static_cast<T>(sd);
    zero_std += (s.count[g] > 0 && !s.differs[g]) ? 1 : 0;
  }
  *out.num_zero_std = zero_std;
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads))
  for (int64_t i = 0; i < n; ++i) {
    out.advantages[i] = static_cast<T>((rewards[i] - mean[index[i]]) / denom[index[i]]);
  }
}

template <typename T>
void token_advantages(const T* advantages, int64_t n, TokenLayout tokens, T* out,
                      int num_threads) {
  for (int64_t t = 0; t < tokens.num_tokens; ++t) {
    const int64_t c = tokens.index[t];
    check_arg(!tokens.mask[t] || (c >= 0 && c < n), "token_index",
              "completion index " + std::to_string(c) + " at unmasked token " +
                  std::to_string(t) + " is outside [0, " + std::to_string(n) + ")");
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads))
  for (int64_t t = 0; t < tokens.num_tokens; ++t) {
    out[t] = tokens.mask[t] ? advantages[tokens.index[t]] : T{0};
  }
}

void check_layout(int64_t n, GroupLayout groups, TokenLayout tokens, AdvantageOptions options) {
  check_arg(n >= 0, "rewards", "length must be >= 0");
  check_arg(groups.num_groups >= 0, "num_groups", "must be >= 0");
  check_arg(std::isfinite(options.eps) && options.eps >= 0.0, "eps",
            "must be a finite number >= 0");
  if (groups.index == nullptr) {
    check_arg(groups.group_size >= 1, "group_size", "must be >= 1");
    check_arg(groups.num_groups * groups.group_size == n, "group_size",
              std::to_string(n) + " rewards do not split into groups of " +
                  std::to_string(groups.group_size));
  }
  check_arg(tokens.num_tokens >= 0, "token_index", "length must be >= 0");
  check_arg(tokens.num_tokens == 0 || (tokens.index != nullptr && tokens.mask != nullptr),
            "response_mask", "token_index and response_mask must be given together");
}

}  // namespace

AdvantageScale parse_advantage_scale(const char* scale) {
  const std::string s(scale);
  if (s == "group") return AdvantageScale::kGroup;
  if (s == "batch") return AdvantageScale::kBatch;
  if (s == "none") return AdvantageScale::kNone;
  throw std::invalid_argument("scale: expected 'group', 'batch' or 'none', got '" + s + "'");
}

template <typename T>
void grpo_advantage(const T* rewards, int64_t n, GroupLayout groups, TokenLayout tokens,
                    AdvantageOptions options, const AdvantageOutputs<T>& out, int num_threads) {
  check_layout(n, groups, tokens, options);
  const double batch_sd = options.scale == AdvantageScale::kBatch
                              ? batch_std(rewards, n, options.unbiased, num_threads)
                              : 0.0;
  if (groups.index == nullptr) {
    contiguous_groups(rewards, groups.group_size, groups.num_groups, options, batch_sd, out,
                      num_threads);
  } else {
    indexed_groups(rewards, n, groups.index, groups.num_groups, options, batch_sd, out,
                   num_threads);
  }
  if (tokens.num_tokens > 0) {
    token_advantages(out.advantages, n, tokens, out.token_advantages, num_threads);
  }
}

template void grpo_advantage<float>(const float*, int64_t, GroupLayout, TokenLayout,
                                    AdvantageOptions, const AdvantageOutputs<float>&, int);
template void grpo_advantage<double>(const double*, int64_t, GroupLayout, TokenLayout,
                                     AdvantageOptions, const AdvantageOutputs<double>&, int);

}  // namespace openr1_mega
