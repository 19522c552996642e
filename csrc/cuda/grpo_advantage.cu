// CUDA kernels for grpo_advantage (maths in ../grpo_advantage.h).
//
// Contiguous groups (fixed size G, any G): one warp per group; the warp reads the group for
// the mean, again for the squared deviations (from L1/L2), and writes the advantages.
// Explicit group indices (variable sizes, any order): a segmented reduction with double
// atomics into per-group sums, counts and squared deviations held in a caller-provided
// workspace, then one pass for the advantages. scale="batch" takes one extra single-block
// two-pass reduction over all rewards. Zero-std groups are counted per block, then added
// once per block to the global counter.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace openr1_mega {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
  return __shfl_sync(kFull, v, 0);
}

// Sum over the block, returned to every thread (blockDim.x a multiple of 32, <= 1024).
__device__ double block_sum(double v) {
  __shared__ double partial[kWarp];
  __shared__ double total;
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) partial[threadIdx.x / kWarp] = v;
  __syncthreads();
  if (threadIdx.x < kWarp) {
    const int warps = blockDim.x / kWarp;
    double p = threadIdx.x < warps ? partial[threadIdx.x] : 0.0;
    p = warp_sum(p);
    if (threadIdx.x == 0) total = p;
  }
  __syncthreads();
  const double out = total;
  __syncthreads();  // `total` and `partial` may be reused by the next call
  return out;
}

__device__ __forceinline__ double std_from(double m2, double count, bool unbiased) {
  const double dof = unbiased ? count - 1.0 : count;
  return (count <= 1.0 || dof <= 0.0) ? 0.0 : sqrt(m2 / dof);
}

__device__ __forceinline__ double denominator(int scale, double eps, double group_sd,
                                              const double* batch_sd) {
  if (scale == 0) return group_sd + eps;
  if (scale == 1) return *batch_sd + eps;
  return 1.0;
}

// Adds each block's count of flagged threads to *total with a single atomic per block.
__device__ void add_block_count(bool flag, unsigned long long* total) {
  __shared__ unsigned int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  if (flag) atomicAdd(&count, 1u);
  __syncthreads();
  if (threadIdx.x == 0 && count > 0) atomicAdd(total, static_cast<unsigned long long>(count));
}

template <typename T>
__global__ void batch_std_kernel(const T* rewards, int64_t n, bool unbiased, double* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += rewards[i];
  const double mean = n > 0 ? block_sum(s) / static_cast<double>(n) : 0.0;
  double m2 = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double d = rewards[i] - mean;
    m2 += d * d;
  }
  m2 = block_sum(m2);
  if (threadIdx.x == 0) *out = std_from(m2, static_cast<double>(n), unbiased);
}

template <typename T>
__global__ void contiguous_kernel(const T* rewards, AdvantageArgs args, const double* batch_sd,
                                  T* adv, T* group_mean, T* group_std,
                                  unsigned long long* zero_std) {
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const bool active = g < args.num_groups;  // uniform within a warp
  bool all_equal = false;
  if (active) {
    const int64_t size = args.group_size;
    const T* r = rewards + g * size;
    const T r0 = r[0];
    double sum = 0.0;
    bool equal = true;
    for (int64_t i = lane; i < size; i += kWarp) {
      sum += r[i];
      equal = equal && r[i] == r0;
    }
    const double mean = warp_sum(sum) / static_cast<double>(size);
    double m2 = 0.0;
    for (int64_t i = lane; i < size; i += kWarp) {
      const double d = r[i] - mean;
      m2 += d * d;
    }
    const double sd = std_from(warp_sum(m2), static_cast<double>(size), args.unbiased);
    const double denom = denominator(args.scale, args.eps, sd, batch_sd);
    for (int64_t i = lane; i < size; i += kWarp) adv[g * size + i] = T((r[i] - mean) / denom);
    all_equal = __all_sync(kFull, equal) && lane == 0;
    if (lane == 0) {
      group_mean[g] = T(mean);
      group_std[g] = T(sd);
    }
  }
  add_block_count(all_equal, zero_std);
}

// Workspace of the indexed path (all zeroed before use, except `first`).
struct Workspace {
  double* batch_sd;
  double* sum;    // per group; then the mean
  double* m2;     // per group; then the denominator
  unsigned long long* count;
  double* first;  // any one member's reward
  int* differs;   // 1 if some member differs from `first`
};

__host__ __device__ inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

Workspace carve(void* base, int64_t k) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.batch_sd = reinterpret_cast<double*>(p);
  p += 16;
  w.sum = reinterpret_cast<double*>(p);
  p += align16(k * sizeof(double));
  w.m2 = reinterpret_cast<double*>(p);
  p += align16(k * sizeof(double));
  w.count = reinterpret_cast<unsigned long long*>(p);
  p += align16(k * sizeof(unsigned long long));
  w.first = reinterpret_cast<double*>(p);
  p += align16(k * sizeof(double));
  w.differs = reinterpret_cast<int*>(p);
  return w;
}

template <typename T>
__global__ void scatter_sums_kernel(const T* rewards, AdvantageArgs args, Workspace w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= args.n) return;
  const int64_t g = args.group_index[i];
  if (g < 0 || g >= args.num_groups) return;  // the caller checks; never write out of bounds
  atomicAdd(&w.sum[g], static_cast<double>(rewards[i]));
  atomicAdd(&w.count[g], 1ull);
  w.first[g] = rewards[i];  // racy by design: any member's value will do
}

template <typename T>
__global__ void scatter_m2_kernel(const T* rewards, AdvantageArgs args, Workspace w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= args.n) return;
  const int64_t g = args.group_index[i];
  if (g < 0 || g >= args.num_groups) return;
  const double d = rewards[i] - w.sum[g] / static_cast<double>(w.count[g]);
  atomicAdd(&w.m2[g], d * d);
  if (static_cast<double>(rewards[i]) != w.first[g]) w.differs[g] = 1;
}

template <typename T>
__global__ void group_stats_kernel(AdvantageArgs args, Workspace w, T* group_mean, T* group_std,
                                   unsigned long long* zero_std) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bool all_equal = false;
  if (g < args.num_groups) {
    const double count = static_cast<double>(w.count[g]);
    const double mean = count > 0.0 ? w.sum[g] / count : 0.0;
    const double sd = std_from(w.m2[g], count, args.unbiased);
    group_mean[g] = T(mean);
    group_std[g] = T(sd);
    w.sum[g] = mean;
    w.m2[g] = denominator(args.scale, args.eps, sd, w.batch_sd);
    all_equal = count > 0.0 && w.differs[g] == 0;
  }
  add_block_count(all_equal, zero_std);
}

template <typename T>
__global__ void indexed_adv_kernel(const T* rewards, AdvantageArgs args, Workspace w, T* adv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= args.n) return;
  const int64_t g = args.group_index[i];
  adv[i] = (g < 0 || g >= args.num_groups) ? T(NAN) : T((rewards[i] - w.sum[g]) / w.m2[g]);
}

template <typename T>
__global__ void token_kernel(const T* adv, AdvantageArgs args, T* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= args.num_tokens) return;
  const int64_t c = args.token_index[t];
  const bool in_range = c >= 0 && c < args.n;
  out[t] = args.response_mask[t] ? (in_range ? adv[c] : T(NAN)) : T(0);
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace

size_t grpo_advantage_workspace_bytes(int64_t num_groups) {
  const size_t k = static_cast<size_t>(num_groups);
  return 16 + 3 * align16(k * sizeof(double)) + align16(k * sizeof(unsigned long long)) +
         align16(k * sizeof(int));
}

template <typename T>
cudaError_t grpo_advantage(const T* rewards, const AdvantageArgs& args, T* advantages,
                           T* token_advantages, T* group_mean, T* group_std,
                           int64_t* num_zero_std, void* workspace, cudaStream_t stream) {
  const Workspace w = carve(workspace, args.num_groups);
  auto* zero_std = reinterpret_cast<unsigned long long*>(num_zero_std);
  cudaError_t err = cudaMemsetAsync(zero_std, 0, sizeof(int64_t), stream);
  if (err == cudaSuccess) {
    err = cudaMemsetAsync(workspace, 0, grpo_advantage_workspace_bytes(args.num_groups), stream);
  }
  if (err != cudaSuccess) return err;
  if (args.scale == 1) {
    batch_std_kernel<T><<<1, 1024, 0, stream>>>(rewards, args.n, args.unbiased, w.batch_sd);
  }
  if (args.group_index == nullptr && args.num_groups > 0) {
    contiguous_kernel<T><<<blocks_for(args.num_groups * kWarp, kThreads), kThreads, 0, stream>>>(
        rewards, args, w.batch_sd, advantages, group_mean, group_std, zero_std);
  } else if (args.group_index != nullptr) {
    if (args.n > 0) {
      scatter_sums_kernel<T><<<blocks_for(args.n, kThreads), kThreads, 0, stream>>>(rewards,
                                                                                   args, w);
      scatter_m2_kernel<T><<<blocks_for(args.n, kThreads), kThreads, 0, stream>>>(rewards, args,
                                                                                 w);
    }
    if (args.num_groups > 0) {
      group_stats_kernel<T><<<blocks_for(args.num_groups, kThreads), kThreads, 0, stream>>>(
          args, w, group_mean, group_std, zero_std);
    }
    if (args.n > 0) {
      indexed_adv_kernel<T><<<blocks_for(args.n, kThreads), kThreads, 0, stream>>>(rewards, args,
                                                                                  w, advantages);
    }
  }
  if (args.token_index != nullptr && args.num_tokens > 0) {
    token_kernel<T><<<blocks_for(args.num_tokens, kThreads), kThreads, 0, stream>>>(
        advantages, args, token_advantages);
  }
  return cudaGetLastError();
}

template cudaError_t grpo_advantage<float>(const float*, const AdvantageArgs&, float*, float*,
                                           float*, float*, int64_t*, void*, cudaStream_t);
template cudaError_t grpo_advantage<double>(const double*, const AdvantageArgs&, double*,
                                            double*, double*, double*, int64_t*, void*,
                                            cudaStream_t);

}  // namespace cuda
}  // namespace openr1_mega
