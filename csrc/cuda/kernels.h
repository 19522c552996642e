// Launchers of the CUDA kernels: plain CUDA C++ on raw device pointers, enqueued on the
// caller's stream (bindings.cpp passes torch's current stream). Same maths and outputs as the
// CPU kernels in ../token_logprob.h and ../grpo_advantage.h; inputs are checked by the caller.
// Each launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common.h"

namespace openr1_mega {
namespace cuda {

// Rows of logits: row r starts at logits + r * row_stride, `cols` entries with unit stride.
struct Rows {
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

// T in {float, double, bf16_t, fp16_t}; statistics in acc_t<T>. `wsum` may be null.
template <typename T>
cudaError_t token_logprob_partials(const T* logits, Rows shape, const int64_t* targets,
                                   int64_t vocab_start, double temperature, acc_t<T>* max,
                                   acc_t<T>* sumexp, acc_t<T>* wsum, acc_t<T>* target_z,
                                   cudaStream_t stream);

// `entropy` may be null.
template <typename T>
cudaError_t token_logprob_forward(const T* logits, Rows shape, const int64_t* targets,
                                  double temperature, acc_t<T>* logp, acc_t<T>* lse,
                                  acc_t<T>* entropy, cudaStream_t stream);

// grad = (a [v == y] + p (b + c log p)) / T per row; `coef_plogp` may be null; grad may alias
// logits (same row stride).
template <typename T>
cudaError_t token_logprob_backward(const T* logits, Rows shape, const int64_t* targets,
                                   int64_t vocab_start, double temperature, const acc_t<T>* lse,
                                   const acc_t<T>* coef_target, const acc_t<T>* coef_p,
                                   const acc_t<T>* coef_plogp, T* grad, int64_t grad_stride,
                                   cudaStream_t stream);

// scale: 0 = group, 1 = batch, 2 = none (openr1_mega::AdvantageScale order).
struct AdvantageArgs {
  int64_t n;
  const int64_t* group_index;  // null: contiguous groups of group_size
  int64_t group_size;
  int64_t num_groups;
  int scale;
  double eps;
  bool unbiased;
  const int64_t* token_index;  // null: no per-token output
  const bool* response_mask;
  int64_t num_tokens;
};

// Bytes of device scratch memory grpo_advantage needs (16-byte aligned pointer).
size_t grpo_advantage_workspace_bytes(int64_t num_groups);

// T in {float, double}. num_zero_std: one int64 on the device.
template <typename T>
cudaError_t grpo_advantage(const T* rewards, const AdvantageArgs& args, T* advantages,
                           T* token_advantages, T* group_mean, T* group_std,
                           int64_t* num_zero_std, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace openr1_mega
