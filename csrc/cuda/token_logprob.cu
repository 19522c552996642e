// CUDA kernels for token_logprob (maths in ../token_logprob.h).
//
// One block per row. Each thread streams its share of the row with 16-byte loads (after a
// scalar head that reaches 16-byte alignment), keeps an online (max, sum-exp, sum-exp * z)
// triple, updating the running max once per 16-byte vector, and the block combines the
// triples with warp shuffles. The row is read exactly once; backward reads it once more and
// writes the gradient in the logits' dtype with the same vector width.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace openr1_mega {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(bf16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float to_acc(fp16_t x) { return __half2float(__ushort_as_half(x.bits)); }

template <typename T>
__device__ __forceinline__ T from_acc_dev(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc_dev<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc_dev<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ bf16_t from_acc_dev<bf16_t>(float x) {  // round to nearest even
  const uint32_t u = __float_as_uint(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded)};
}
template <>
__device__ __forceinline__ fp16_t from_acc_dev<fp16_t>(float x) {
  return fp16_t{__half_as_ushort(__float2half_rn(x))};
}

__device__ __forceinline__ float dev_exp(float x) { return __expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float lowest_log(float) { return -88.0f; }
__device__ __forceinline__ double lowest_log(double) { return -745.0; }
template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

template <typename A>
struct Stats {
  A m;  // running max of z
  A s;  // sum of exp(z - m)
  A w;  // sum of exp(z - m) * (z - m)
};

// Moves `st` to the max `m` (>= st.m); an empty triple (s == 0) stays empty.
template <typename A>
__device__ __forceinline__ Stats<A> rescaled(Stats<A> st, A m) {
  if (st.s > A(0)) {
    const A scale = dev_exp(st.m - m);
    return Stats<A>{m, st.s * scale, scale * (st.w + (st.m - m) * st.s)};
  }
  return Stats<A>{m, A(0), A(0)};
}

template <typename A>
__device__ __forceinline__ Stats<A> combine(Stats<A> a, Stats<A> b) {
  const A m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<A>()) return Stats<A>{m, A(0), A(0)};
  const Stats<A> ra = rescaled(a, m);
  const Stats<A> rb = rescaled(b, m);
  return Stats<A>{m, ra.s + rb.s, ra.w + rb.w};
}

// Adds k already-scaled logits z[0..k) to the thread's triple.
template <typename A, bool kEntropy, int K>
__device__ __forceinline__ void accumulate(Stats<A>& st, const A (&z)[K]) {
  A vm = z[0];
#pragma unroll
  for (int i = 1; i < K; ++i) vm = z[i] > vm ? z[i] : vm;
  if (vm == neg_inf<A>()) return;  // all -inf: adds nothing
  if (vm > st.m) st = rescaled(st, vm);
  const A lo = lowest_log(A(0));
#pragma unroll
  for (int i = 0; i < K; ++i) {
    A d = z[i] - st.m;
    d = d < lo ? lo : d;
    const A e = dev_exp(d);
    st.s += e;
    if (kEntropy) st.w += e * d;
  }
}

template <typename A>
__device__ Stats<A> block_reduce(Stats<A> st) {
  __shared__ Stats<A> warp_stats[kThreads / kWarp];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const Stats<A> other{__shfl_down_sync(0xffffffffu, st.m, offset),
                         __shfl_down_sync(0xffffffffu, st.s, offset),
                         __shfl_down_sync(0xffffffffu, st.w, offset)};
    st = combine(st, other);
  }
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    st = lane < warps ? warp_stats[lane] : Stats<A>{neg_inf<A>(), A(0), A(0)};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const Stats<A> other{__shfl_down_sync(0xffffffffu, st.m, offset),
                           __shfl_down_sync(0xffffffffu, st.s, offset),
                           __shfl_down_sync(0xffffffffu, st.w, offset)};
      st = combine(st, other);
    }
  }
  return st;  // valid in thread 0
}

// Number of leading elements before x + head is 16-byte aligned (x is sizeof(T)-aligned).
template <typename T>
__device__ __forceinline__ int64_t aligned_head(const T* x, int64_t cols) {
  constexpr int64_t kVec = 16 / sizeof(T);
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(x) % 16) / sizeof(T));
  const int64_t head = mis == 0 ? 0 : kVec - mis;
  return head < cols ? head : cols;
}

template <typename T>
union Pack {
  uint4 raw;
  T vals[16 / sizeof(T)];
};

template <typename T, bool kEntropy>
__device__ Stats<acc_t<T>> row_stats(const T* x, int64_t cols, acc_t<T> inv_t) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  Stats<A> st{neg_inf<A>(), A(0), A(0)};
  const int64_t head = aligned_head(x, cols);
  const int64_t body = (cols - head) / kVec;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const A z[1] = {to_acc(x[i]) * inv_t};
    accumulate<A, kEntropy>(st, z);
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  for (int64_t j = threadIdx.x; j < body; j += blockDim.x) {
    Pack<T> pack;
    pack.raw = xv[j];
    A z[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) z[k] = to_acc(pack.vals[k]) * inv_t;
    accumulate<A, kEntropy>(st, z);
  }
  for (int64_t i = head + body * kVec + threadIdx.x; i < cols; i += blockDim.x) {
    const A z[1] = {to_acc(x[i]) * inv_t};
    accumulate<A, kEntropy>(st, z);
  }
  return block_reduce(st);
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* logits, Rows shape, const int64_t* targets, acc_t<T> inv_t,
                   acc_t<T>* logp, acc_t<T>* lse, acc_t<T>* entropy) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const T* x = logits + r * shape.row_stride;
  const Stats<A> st = row_stats<T, kEntropy>(x, shape.cols, inv_t);
  if (threadIdx.x == 0) {
    const A log_s = dev_log(st.s);
    const A row_lse = st.m + log_s;
    const int64_t y = targets[r];
    const A z_y = (y >= 0 && y < shape.cols) ? to_acc(x[y]) * inv_t : A(NAN);
    lse[r] = row_lse;
    logp[r] = z_y - row_lse;
    if (kEntropy) entropy[r] = log_s - st.w / st.s;
  }
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(const T* logits, Rows shape, const int64_t* targets, int64_t vocab_start,
                    acc_t<T> inv_t, acc_t<T>* max, acc_t<T>* sumexp, acc_t<T>* wsum,
                    acc_t<T>* target_z) {
  using A = acc_t<T>;
  const int64_t r = blockIdx.x;
  const T* x = logits + r * shape.row_stride;
  const Stats<A> st = row_stats<T, kEntropy>(x, shape.cols, inv_t);
  if (threadIdx.x == 0) {
    const int64_t local = targets[r] - vocab_start;
    max[r] = st.m;
    sumexp[r] = st.s;
    if (kEntropy) wsum[r] = st.w;
    target_z[r] = (local >= 0 && local < shape.cols) ? to_acc(x[local]) * inv_t : A(0);
  }
}

template <typename A>
struct GradRow {
  A lse, a, bt, ct;  // a, b, c already divided by T
  int64_t target;    // local column of the target, or -1
  A inv_t;

  __device__ __forceinline__ A operator()(A x, int64_t v) const {
    A lp = x * inv_t - lse;
    const A lo = lowest_log(A(0));
    lp = lp < lo ? lo : lp;
    const A g = dev_exp(lp) * (bt + ct * lp);
    return v == target ? g + a : g;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, Rows shape, const int64_t* targets, int64_t vocab_start,
                    acc_t<T> inv_t, const acc_t<T>* lse, const acc_t<T>* coef_target,
                    const acc_t<T>* coef_p, const acc_t<T>* coef_plogp, T* grad,
                    int64_t grad_stride) {
  using A = acc_t<T>;
  constexpr int kVec = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  const T* x = logits + r * shape.row_stride;
  T* g = grad + r * grad_stride;
  const int64_t local = targets[r] - vocab_start;
  const GradRow<A> f{lse[r], coef_target[r] * inv_t, coef_p[r] * inv_t,
                     coef_plogp != nullptr ? coef_plogp[r] * inv_t : A(0),
                     (local >= 0 && local < shape.cols) ? local : -1, inv_t};
  const bool same_alignment =
      reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16;
  const int64_t head = same_alignment ? aligned_head(x, shape.cols) : shape.cols;
  const int64_t body = (shape.cols - head) / kVec;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    g[i] = from_acc_dev<T>(f(to_acc(x[i]), i));
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* gv = reinterpret_cast<uint4*>(g + head);
  for (int64_t j = threadIdx.x; j < body; j += blockDim.x) {
    Pack<T> in, out;
    in.raw = xv[j];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      out.vals[k] = from_acc_dev<T>(f(to_acc(in.vals[k]), head + j * kVec + k));
    }
    gv[j] = out.raw;
  }
  for (int64_t i = head + body * kVec + threadIdx.x; i < shape.cols; i += blockDim.x) {
    g[i] = from_acc_dev<T>(f(to_acc(x[i]), i));
  }
}

}  // namespace

template <typename T>
cudaError_t token_logprob_partials(const T* logits, Rows shape, const int64_t* targets,
                                   int64_t vocab_start, double temperature, acc_t<T>* max,
                                   acc_t<T>* sumexp, acc_t<T>* wsum, acc_t<T>* target_z,
                                   cudaStream_t stream) {
  if (shape.rows == 0) return cudaSuccess;
  const acc_t<T> inv_t = static_cast<acc_t<T>>(1.0 / temperature);
  if (wsum != nullptr) {
    partials_kernel<T, true><<<shape.rows, kThreads, 0, stream>>>(
        logits, shape, targets, vocab_start, inv_t, max, sumexp, wsum, target_z);
  } else {
    partials_kernel<T, false><<<shape.rows, kThreads, 0, stream>>>(
        logits, shape, targets, vocab_start, inv_t, max, sumexp, wsum, target_z);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t token_logprob_forward(const T* logits, Rows shape, const int64_t* targets,
                                  double temperature, acc_t<T>* logp, acc_t<T>* lse,
                                  acc_t<T>* entropy, cudaStream_t stream) {
  if (shape.rows == 0) return cudaSuccess;
  const acc_t<T> inv_t = static_cast<acc_t<T>>(1.0 / temperature);
  if (entropy != nullptr) {
    forward_kernel<T, true><<<shape.rows, kThreads, 0, stream>>>(logits, shape, targets, inv_t,
                                                                 logp, lse, entropy);
  } else {
    forward_kernel<T, false><<<shape.rows, kThreads, 0, stream>>>(logits, shape, targets, inv_t,
                                                                  logp, lse, entropy);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t token_logprob_backward(const T* logits, Rows shape, const int64_t* targets,
                                   int64_t vocab_start, double temperature, const acc_t<T>* lse,
                                   const acc_t<T>* coef_target, const acc_t<T>* coef_p,
                                   const acc_t<T>* coef_plogp, T* grad, int64_t grad_stride,
                                   cudaStream_t stream) {
  if (shape.rows == 0) return cudaSuccess;
  const acc_t<T> inv_t = static_cast<acc_t<T>>(1.0 / temperature);
  backward_kernel<T><<<shape.rows, kThreads, 0, stream>>>(logits, shape, targets, vocab_start,
                                                          inv_t, lse, coef_target, coef_p,
                                                          coef_plogp, grad, grad_stride);
  return cudaGetLastError();
}

#define OPENR1_MEGA_CUDA_INSTANTIATE(T)                                                        \
  template cudaError_t token_logprob_partials<T>(const T*, Rows, const int64_t*, int64_t,     \
                                                 double, acc_t<T>*, acc_t<T>*, acc_t<T>*,      \
                                                 acc_t<T>*, cudaStream_t);                     \
  template cudaError_t token_logprob_forward<T>(const T*, Rows, const int64_t*, double,       \
                                                acc_t<T>*, acc_t<T>*, acc_t<T>*, cudaStream_t); \
  template cudaError_t token_logprob_backward<T>(const T*, Rows, const int64_t*, int64_t,     \
                                                 double, const acc_t<T>*, const acc_t<T>*,     \
                                                 const acc_t<T>*, const acc_t<T>*, T*, int64_t, \
                                                 cudaStream_t);

OPENR1_MEGA_CUDA_INSTANTIATE(float)
OPENR1_MEGA_CUDA_INSTANTIATE(double)
OPENR1_MEGA_CUDA_INSTANTIATE(bf16_t)
OPENR1_MEGA_CUDA_INSTANTIATE(fp16_t)

}  // namespace cuda
}  // namespace openr1_mega
