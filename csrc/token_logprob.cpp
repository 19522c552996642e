// CPU kernels for token_logprob (see token_logprob.h for the maths).
//
// Rows run in parallel with OpenMP. Within a row, logits are read once, in blocks of kBlock:
// convert + scale into an L1-resident buffer while taking the block max, rescale the running
// sum if the max grew, then sum exp(z - m) over the buffer. The inner loops are `omp simd`
// reductions over exp_fast, and the row routines are compiled per ISA level (AVX-512, AVX2,
// baseline) with runtime selection, so no -march flag is needed.
#include "token_logprob.h"

#include <algorithm>
#include <cmath>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace openr1_mega {
namespace {

constexpr int64_t kBlock = 1024;

// Running statistics of one row: max m (as z), and sums in double across blocks.
struct RowStats {
  double m;
  double s;
  double w;
};

OPENR1_MEGA_INLINE float exp_acc(float x) { return exp_fast(x); }
OPENR1_MEGA_INLINE double exp_acc(double x) { return std::exp(x); }

// Lowest log-probability kept: below it exp() is 0 and p * log p must stay 0, not NaN.
OPENR1_MEGA_INLINE float lowest_log(float) { return -88.0f; }
OPENR1_MEGA_INLINE double lowest_log(double) { return -745.0; }

template <typename T, typename A, bool kEntropy>
OPENR1_MEGA_INLINE void row_stats_impl(const T* x, int64_t cols, A inv_t, RowStats* out) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const A lo = lowest_log(A{});
  A buf[kBlock];
  A m = kNegInf;
  double s = 0.0;
  double w = 0.0;
  for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
    const int64_t len = std::min(kBlock, cols - b0);
    A bm = kNegInf;
#pragma omp simd reduction(max : bm)
    for (int64_t i = 0; i < len; ++i) {
      const A z = to_float(x[b0 + i]) * inv_t;
      buf[i] = z;
      bm = bm > z ? bm : z;
    }
    if (bm == kNegInf) {
      continue;  // a block of -inf logits adds nothing
    }
    if (bm > m) {
      if (s > 0.0) {  // rescale the sums to the new max
        const double scale = std::exp(static_cast<double>(m) - bm);
        w = scale * (w + (static_cast<double>(m) - bm) * s);
        s = scale * s;
      }
      m = bm;
    }
    A bs = 0;
    A bw = 0;
#pragma omp simd reduction(+ : bs, bw)
    for (int64_t i = 0; i < len; ++i) {
      A d = buf[i] - m;
      d = d < lo ? lo : d;
      const A e = exp_acc(d);
      bs += e;
      if constexpr (kEntropy) {
        bw += e * d;
      }
    }
    s += bs;
    w += bw;
  }
  *out = RowStats{static_cast<double>(m), s, w};
}

template <typename T, typename A>
OPENR1_MEGA_INLINE void row_grad_impl(const T* x, int64_t cols, A inv_t, A lse, A b, A c,
                                      T* grad) {
  const A lo = lowest_log(A{});
  const A bt = b * inv_t;
  const A ct = c * inv_t;
#pragma omp simd
  for (int64_t v = 0; v < cols; ++v) {
    A lp = to_float(x[v]) * inv_t - lse;
    lp = lp < lo ? lo : lp;
    const A p = exp_acc(lp);
    grad[v] = from_acc<T>(p * (bt + ct * lp));
  }
}

// Non-template entry points per dtype, so that each can be cloned per ISA level.
#define OPENR1_MEGA_ROW_KERNELS(T, A, SUFFIX)                                                 \
  OPENR1_MEGA_CLONES void row_stats_##SUFFIX(const T* x, int64_t cols, A inv_t, bool entropy, \
                                             RowStats* out) {                                 \
    if (entropy) {                                                                            \
      row_stats_impl<T, A, true>(x, cols, inv_t, out);                                        \
    } else {                                                                                  \
      row_stats_impl<T, A, false>(x, cols, inv_t, out);                                       \
    }                                                                                         \
  }                                                                                           \
  OPENR1_MEGA_CLONES void row_grad_##SUFFIX(const T* x, int64_t cols, A inv_t, A lse, A b,    \
                                            A c, T* grad) {                                   \
    row_grad_impl<T, A>(x, cols, inv_t, lse, b, c, grad);                                     \
  }                                                                                           \
  OPENR1_MEGA_INLINE void row_stats(const T* x, int64_t cols, A inv_t, bool entropy,          \
                                    RowStats* out) {                                          \
    row_stats_##SUFFIX(x, cols, inv_t, entropy, out);                                         \
  }                                                                                           \
  OPENR1_MEGA_INLINE void row_grad(const T* x, int64_t cols, A inv_t, A lse, A b, A c,        \
                                   T* grad) {                                                 \
    row_grad_##SUFFIX(x, cols, inv_t, lse, b, c, grad);                                       \
  }

OPENR1_MEGA_ROW_KERNELS(float, float, f32)
OPENR1_MEGA_ROW_KERNELS(bf16_t, float, bf16)
OPENR1_MEGA_ROW_KERNELS(fp16_t, float, f16)

// float64 logits: reference-grade precision (std::exp), used by gradcheck; no clones.
void row_stats(const double* x, int64_t cols, double inv_t, bool entropy, RowStats* out) {
  if (entropy) {
    row_stats_impl<double, double, true>(x, cols, inv_t, out);
  } else {
    row_stats_impl<double, double, false>(x, cols, inv_t, out);
  }
}

void row_grad(const double* x, int64_t cols, double inv_t, double lse, double b, double c,
              double* grad) {
  row_grad_impl<double, double>(x, cols, inv_t, lse, b, c, grad);
}

void check_shape(LogitsShape shape, double temperature) {
  check_arg(shape.rows >= 0, "logits", "number of rows must be >= 0");
  check_arg(shape.cols >= 1, "logits", "vocab dimension must be >= 1");
  check_arg(shape.row_stride >= shape.cols || shape.rows <= 1, "logits",
            "row stride must be >= the vocab size");
  check_arg(std::isfinite(temperature) && temperature > 0.0, "temperature",
            "must be a finite number > 0, got " + std::to_string(temperature));
}

void check_targets(const int64_t* targets, int64_t rows, int64_t low, int64_t high) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = targets[r];
    check_arg(y >= low && y < high, "targets",
              "value " + std::to_string(y) + " at position " + std::to_string(r) +
                  " is outside [" + std::to_string(low) + ", " + std::to_string(high) + ")");
  }
}

// num_threads <= 0: the OpenMP default.
int threads_for(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  return num_threads > 0 ? num_threads : 1;
#endif
}

}  // namespace

template <typename T>
void token_logprob_partials(const T* logits, LogitsShape shape, const int64_t* targets,
                            int64_t vocab_start, double temperature,
                            const LogprobPartials<acc_t<T>>& out, int num_threads) {
  using A = acc_t<T>;
  check_shape(shape, temperature);
  check_arg(vocab_start >= 0, "vocab_start", "must be >= 0");
  check_targets(targets, shape.rows, 0, std::numeric_limits<int64_t>::max());
  const A inv_t = static_cast<A>(1.0 / temperature);
  const bool entropy = out.wsum != nullptr;
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    RowStats st;
    row_stats(x, shape.cols, inv_t, entropy, &st);
    out.max[r] = static_cast<A>(st.m);
    out.sumexp[r] = static_cast<A>(st.s);
    if (entropy) {
      out.wsum[r] = static_cast<A>(st.w);
    }
    const int64_t local = targets[r] - vocab_start;
    const bool owned = local >= 0 && local < shape.cols;
    out.target_z[r] = owned ? to_float(x[local]) * inv_t : A{0};
  }
}

template <typename T>
void token_logprob_forward(const T* logits, LogitsShape shape, const int64_t* targets,
                           double temperature, acc_t<T>* logp, acc_t<T>* lse,
                           acc_t<T>* entropy, int num_threads) {
  using A = acc_t<T>;
  check_shape(shape, temperature);
  check_targets(targets, shape.rows, 0, shape.cols);
  const A inv_t = static_cast<A>(1.0 / temperature);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    RowStats st;
    row_stats(x, shape.cols, inv_t, entropy != nullptr, &st);
    const double log_s = std::log(st.s);
    const double row_lse = st.m + log_s;
    lse[r] = static_cast<A>(row_lse);
    logp[r] = static_cast<A>(static_cast<double>(to_float(x[targets[r]]) * inv_t) - row_lse);
    if (entropy != nullptr) {
      entropy[r] = static_cast<A>(log_s - st.w / st.s);
    }
  }
}

template <typename T>
void token_logprob_backward(const T* logits, LogitsShape shape, const int64_t* targets,
                            int64_t vocab_start, double temperature, const acc_t<T>* lse,
                            const LogprobGradCoefs<acc_t<T>>& coefs, T* grad_logits,
                            int64_t grad_stride, int num_threads) {
  using A = acc_t<T>;
  check_shape(shape, temperature);
  check_arg(grad_stride >= shape.cols || shape.rows <= 1, "grad_logits",
            "row stride must be >= the vocab size");
  const A inv_t = static_cast<A>(1.0 / temperature);
  const A lo = lowest_log(A{});
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    T* g = grad_logits + r * grad_stride;
    const int64_t local = targets[r] - vocab_start;
    const bool owned = local >= 0 && local < shape.cols;
    const A x_target = owned ? to_float(x[local]) : A{0};  // read before g may overwrite it
    const A c = coefs.plogp != nullptr ? coefs.plogp[r] : A{0};
    row_grad(x, shape.cols, inv_t, lse[r], coefs.p[r], c, g);
    if (owned) {
      A lp = x_target * inv_t - lse[r];
      lp = lp < lo ? lo : lp;
      const A p = exp_acc(lp);
      g[local] = from_acc<T>((coefs.target[r] + p * (coefs.p[r] + c * lp)) * inv_t);
    }
  }
}

#define OPENR1_MEGA_INSTANTIATE(T)                                                            \
  template void token_logprob_partials<T>(const T*, LogitsShape, const int64_t*, int64_t,    \
                                          double, const LogprobPartials<acc_t<T>>&, int);     \
  template void token_logprob_forward<T>(const T*, LogitsShape, const int64_t*, double,      \
                                         acc_t<T>*, acc_t<T>*, acc_t<T>*, int);               \
  template void token_logprob_backward<T>(const T*, LogitsShape, const int64_t*, int64_t,    \
                                          double, const acc_t<T>*,                            \
                                          const LogprobGradCoefs<acc_t<T>>&, T*, int64_t, int);

OPENR1_MEGA_INSTANTIATE(float)
OPENR1_MEGA_INSTANTIATE(double)
OPENR1_MEGA_INSTANTIATE(bf16_t)
OPENR1_MEGA_INSTANTIATE(fp16_t)

}  // namespace openr1_mega
