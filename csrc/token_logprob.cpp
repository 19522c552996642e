// CPU kernels for token_logprob (see token_logprob.h for the maths).
//
// Rows run in parallel with OpenMP, scheduled `guided` (shrinking chunks taken as threads come
// free), so a thread that loses its core to another process for a while does not hold up the
// rest; each row is read once forward and once backward. The row
// loops exist three times, and every call picks one by active_cpu_isa() (cpu_isa.h):
//   avx512, avx2  explicit SIMD (token_logprob_rows.inc on simd_avx512.inc / simd_avx2.inc),
//                 compiled in `#pragma GCC target` regions, so no -march flag is needed: one
//                 pass with a running reference, a vector exp, 16-bit conversions in registers;
//   baseline      the portable loops below (blocks of kBlock converted into an L1 buffer, then
//                 an `omp simd` sum of exp_fast), auto-vectorised for the default target; also
//                 the float64 path (std::exp), which gradcheck uses.
#include "token_logprob.h"

#include "cpu_isa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if OPENR1_MEGA_X86_SIMD
#include <immintrin.h>
#endif

namespace openr1_mega {
namespace {

constexpr int64_t kBlock = 1024;
// Lowest log-probability kept: below it exp() is 0 and p * log p must stay 0, not NaN.
constexpr float kLowestLog = -88.0f;

// Running statistics of one row: max m (as z), and sums in double across blocks.
struct RowStats {
  double m;
  double s;
  double w;
};

}  // namespace

namespace baseline {
namespace {

OPENR1_MEGA_INLINE float exp_acc(float x) { return exp_fast(x); }
OPENR1_MEGA_INLINE double exp_acc(double x) { return std::exp(x); }

OPENR1_MEGA_INLINE float lowest_log(float) { return kLowestLog; }
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

template <typename T, typename A>
void row_stats(const T* x, int64_t cols, A inv_t, bool entropy, RowStats* out) {
  if (entropy) {
    row_stats_impl<T, A, true>(x, cols, inv_t, out);
  } else {
    row_stats_impl<T, A, false>(x, cols, inv_t, out);
  }
}

template <typename T, typename A>
void row_grad(const T* x, int64_t cols, A inv_t, A lse, A b, A c, T* grad) {
  row_grad_impl<T, A>(x, cols, inv_t, lse, b, c, grad);
}

}  // namespace
}  // namespace baseline

#if OPENR1_MEGA_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
namespace {
#include "simd_avx2.inc"
#include "token_logprob_rows.inc"
}  // namespace
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_ps
namespace avx512 {
namespace {
#include "simd_avx512.inc"
#include "token_logprob_rows.inc"
}  // namespace
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

// One row's statistics with the row loop of `isa` (float64 always takes the baseline loop).
template <typename T, typename A>
OPENR1_MEGA_INLINE void row_stats(CpuIsa isa, const T* x, int64_t cols, A inv_t, bool entropy,
                                  RowStats* out) {
#if OPENR1_MEGA_X86_SIMD
  if constexpr (!std::is_same_v<T, double>) {
    if (isa == CpuIsa::kAvx512) {
      return avx512::row_stats(x, cols, inv_t, entropy, out);
    }
    if (isa == CpuIsa::kAvx2) {
      return avx2::row_stats(x, cols, inv_t, entropy, out);
    }
  }
#endif
  baseline::row_stats(x, cols, inv_t, entropy, out);
}

template <typename T, typename A>
OPENR1_MEGA_INLINE void row_grad(CpuIsa isa, const T* x, int64_t cols, A inv_t, A lse, A b, A c,
                                 T* grad) {
#if OPENR1_MEGA_X86_SIMD
  if constexpr (!std::is_same_v<T, double>) {
    if (isa == CpuIsa::kAvx512) {
      return avx512::row_grad(x, cols, inv_t, lse, b, c, grad);
    }
    if (isa == CpuIsa::kAvx2) {
      return avx2::row_grad(x, cols, inv_t, lse, b, c, grad);
    }
  }
#endif
  baseline::row_grad(x, cols, inv_t, lse, b, c, grad);
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
  const CpuIsa isa = active_cpu_isa();
#pragma omp parallel for schedule(guided) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    RowStats st;
    row_stats(isa, x, shape.cols, inv_t, entropy, &st);
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
  const CpuIsa isa = active_cpu_isa();
#pragma omp parallel for schedule(guided) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    RowStats st;
    row_stats(isa, x, shape.cols, inv_t, entropy != nullptr, &st);
    const double log_s = std::log(st.s);
    const double row_lse = st.m + log_s;
    lse[r] = static_cast<A>(row_lse);
    // <= 0 as every log-probability; the polynomial exp may otherwise leave a few 1e-6 above
    // when the target is the row's max and that max first appears after the first block.
    const double row_logp = static_cast<double>(to_float(x[targets[r]]) * inv_t) - row_lse;
    logp[r] = static_cast<A>(std::min(row_logp, 0.0));
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
  const A lo = baseline::lowest_log(A{});
  const CpuIsa isa = active_cpu_isa();
#pragma omp parallel for schedule(guided) num_threads(threads_for(num_threads))
  for (int64_t r = 0; r < shape.rows; ++r) {
    const T* x = logits + r * shape.row_stride;
    T* g = grad_logits + r * grad_stride;
    const int64_t local = targets[r] - vocab_start;
    const bool owned = local >= 0 && local < shape.cols;
    const A x_target = owned ? to_float(x[local]) : A{0};  // read before g may overwrite it
    const A c = coefs.plogp != nullptr ? coefs.plogp[r] : A{0};
    row_grad(isa, x, shape.cols, inv_t, lse[r], coefs.p[r], c, g);
    if (owned) {
      A lp = x_target * inv_t - lse[r];
      lp = lp < lo ? lo : lp;
      const A p = baseline::exp_acc(lp);
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
