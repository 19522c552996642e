// Group-relative advantages (GRPO), CPU kernel.
//
// For completions grouped by prompt, with group mean mu_g and standard deviation sd_g:
//   A_i = (r_i - mu_g) / (sd_g + eps)     scale = kGroup
//   A_i = (r_i - mu_g) / (sd_B + eps)     scale = kBatch (sd_B: std over the whole batch)
//   A_i =  r_i - mu_g                     scale = kNone  (Dr. GRPO)
// sd is unbiased (divides by n - 1, as TRL and verl do) or biased (divides by n); a group or
// batch of one has sd = 0. Fused outputs: per-group mean and sd, the number of non-empty
// groups whose rewards are all exactly equal (zero-advantage groups), and optionally
// per-token advantages for a packed token layout: token_adv[t] = mask[t] ? A[index[t]] : 0.
// Sums accumulate in double; rewards and outputs are T in {float, double}.
#pragma once

#include <cstdint>

#include "common.h"

namespace openr1_mega {

enum class AdvantageScale { kGroup, kBatch, kNone };

// Parses "group" | "batch" | "none"; throws std::invalid_argument naming `scale` otherwise.
AdvantageScale parse_advantage_scale(const char* scale);

// Groups: either contiguous runs of `group_size` (index == nullptr, num_groups * group_size
// == n) or an explicit dense group index in [0, num_groups) per completion.
struct GroupLayout {
  const int64_t* index;
  int64_t group_size;
  int64_t num_groups;
};

// Packed token layout for the per-token output: token t belongs to completion index[t]
// (read only where mask[t] is true). num_tokens == 0 or index == nullptr: no token output.
struct TokenLayout {
  const int64_t* index;
  const bool* mask;
  int64_t num_tokens;
};

template <typename T>
struct AdvantageOutputs {
  T* advantages;         // [n]
  T* token_advantages;   // [num_tokens], may be null when there is no token layout
  T* group_mean;         // [num_groups]
  T* group_std;          // [num_groups]
  int64_t* num_zero_std; // [1]
};

struct AdvantageOptions {
  AdvantageScale scale;
  double eps;
  bool unbiased;
};

// Throws std::invalid_argument naming the argument on a bad layout or index.
template <typename T>
void grpo_advantage(const T* rewards, int64_t n, GroupLayout groups, TokenLayout tokens,
                    AdvantageOptions options, const AdvantageOutputs<T>& out, int num_threads);

}  // namespace openr1_mega
