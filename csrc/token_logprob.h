// Per-token log-probabilities (and entropies) of target tokens under logits, CPU kernels.
//
// With z = logits / T for one row of V logits and target y:
//   logp    = z[y] - lse,   lse = m + log(s),   m = max_v z[v],   s = sum_v exp(z[v] - m)
//   entropy = log(s) - w / s,                    w = sum_v exp(z[v] - m) * (z[v] - m)
// One pass over each row computes (m, s, w) online, block by block, so a row is read once.
// The vocab-parallel form returns these per-rank partials (plus the target logit when the
// rank owns it); the caller combines them across ranks.
//
// Backward, written directly in the logits' dtype (no fp32 [N, V] buffer):
//   grad[v] = (a * [v == y] + p[v] * (b + c * log p[v])) / T,   p[v] = exp(z[v] - lse)
// with per-row coefficients a, b, c chosen by the caller: for upstream grads g_logp, g_lse,
// g_ent of (logp, lse, entropy): a = g_logp, b = -g_logp + g_lse - g_ent * entropy, c = -g_ent.
//
// Types: T in {float, double, bf16_t, fp16_t}; statistics are acc_t<T> (double for double
// logits, float otherwise). Logits rows are contiguous, row r starts at logits + r * row_stride.
#pragma once

#include <cstdint>

#include "common.h"

namespace openr1_mega {

// Per-row statistics of one vocab shard. `wsum` may be null when entropy is not needed.
template <typename A>
struct LogprobPartials {
  A* max;       // m, the shard's max of z (-inf for a row of -inf logits)
  A* sumexp;    // s, sum of exp(z - m) over the shard
  A* wsum;      // w, sum of exp(z - m) * (z - m) over the shard (null: not computed)
  A* target_z;  // z[y] if vocab_start <= y < vocab_start + cols, else 0
};

// Shape of a [rows, cols] logits matrix with unit column stride.
struct LogitsShape {
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// Partials over a vocab shard holding global columns [vocab_start, vocab_start + cols).
// Throws std::invalid_argument if a target is negative or the shape is invalid.
template <typename T>
void token_logprob_partials(const T* logits, LogitsShape shape, const int64_t* targets,
                            int64_t vocab_start, double temperature,
                            const LogprobPartials<acc_t<T>>& out, int num_threads);

// Full-vocabulary forward: logp[r], lse[r] and (when `entropy` is not null) entropy[r].
// Throws std::invalid_argument if a target lies outside [0, cols).
template <typename T>
void token_logprob_forward(const T* logits, LogitsShape shape, const int64_t* targets,
                           double temperature, acc_t<T>* logp, acc_t<T>* lse,
                           acc_t<T>* entropy, int num_threads);

// Per-row backward coefficients (see the file comment); `plogp` may be null (c = 0).
template <typename A>
struct LogprobGradCoefs {
  const A* target;  // a
  const A* p;       // b
  const A* plogp;   // c
};

// grad_logits (same shape as the shard, contiguous rows of `grad_stride`) from the saved
// global lse. grad_logits may alias logits (each element is read before it is written).
template <typename T>
void token_logprob_backward(const T* logits, LogitsShape shape, const int64_t* targets,
                            int64_t vocab_start, double temperature, const acc_t<T>* lse,
                            const LogprobGradCoefs<acc_t<T>>& coefs, T* grad_logits,
                            int64_t grad_stride, int num_threads);

}  // namespace openr1_mega
