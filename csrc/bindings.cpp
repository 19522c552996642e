// The torch side of the kernels: TORCH_LIBRARY schemas (namespace openr1_mega) and the CPU
// (and, when built with a CUDA torch, CUDA) implementations, which check their tensors, allocate
// outputs and call the raw-pointer kernels. The only file that includes torch; fake kernels and
// autograd are registered in Python (openr1_mega/ops/).
//
// Ops:
//   token_logprob_fwd(logits, targets, temperature, with_entropy) -> (logp, lse, entropy)
//   token_logprob_partials(logits, targets, vocab_start, temperature, with_entropy)
//       -> (max, sumexp, wsum, target_z)                 one vocab shard's statistics
//   token_logprob_bwd(logits, targets, vocab_start, temperature, lse, coef_target, coef_p,
//       coef_plogp) -> grad_logits                       in logits' dtype
//   token_logprob_bwd_(logits!, ...same...) -> ()        the same, written over the logits
//   grpo_advantage(rewards, group_index, group_size, num_groups, scale, eps, unbiased,
//       token_index, response_mask) -> (advantages, token_advantages, group_mean, group_std,
//       num_zero_std)
//   release_grad_cache() -> int                          unmaps the cached gradient buffer
//                                                        (grad_buffer.h); returns its bytes
//   cpu_isa() -> str                                     the SIMD level the CPU kernels use now
//                                                        (avx512 | avx2 | baseline, cpu_isa.h)
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu_isa.h"
#include "grad_buffer.h"
#include "grpo_advantage.h"
#include "token_logprob.h"

#ifdef OPENR1_MEGA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

// `import openr1_mega._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace openr1_mega {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with T the kernel type of a torch dtype.
template <typename Fn>
void dispatch_logits(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Tag<float>{});
    case at::kDouble: return fn(Tag<double>{});
    case at::kBFloat16: return fn(Tag<bf16_t>{});
    case at::kHalf: return fn(Tag<fp16_t>{});
    default:
      TORCH_CHECK_VALUE(false, "logits: dtype must be float32, float64, bfloat16 or float16, got ",
                        dtype);
  }
}

// Kernel argument errors (std::invalid_argument naming the argument) become ValueError.
template <typename Fn>
void run_checked(Fn&& fn) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

at::ScalarType acc_dtype(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const Tensor& logits, const Tensor& targets) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D [N, V] tensor, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "logits: the vocab dimension must be >= 1");
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || logits.size(1) == 1,
                    "logits: the vocab dimension must have stride 1, got ", logits.strides());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0),
                    "targets: expected shape [", logits.size(0), "], got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kLong, "targets: dtype must be int64, got ",
                    targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), "targets: must be on ",
                    logits.device(), " like logits, got ", targets.device());
}

// A per-row statistic (lse or a backward coefficient): [N], acc dtype, logits' device.
Tensor checked_row_vector(const Tensor& t, const char* name, const Tensor& logits) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), name, ": expected shape [",
                    logits.size(0), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == acc_dtype(logits), name, ": dtype must be ",
                    acc_dtype(logits), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": must be on ", logits.device());
  return t.contiguous();
}

Tensor empty_rows(const Tensor& logits, int64_t n) {
  return at::empty({n}, logits.options().dtype(acc_dtype(logits)));
}

template <typename A>
A* data_or_null(const Tensor& t, bool present) {
  return present ? t.data_ptr<A>() : nullptr;
}

// A new CPU tensor like `logits` for the gradient: large ones live in a buffer of the
// gradient cache (grad_buffer.h), given back to it when the tensor is freed; small ones come
// from the ordinary allocator.
Tensor empty_grad_cpu(const Tensor& logits) {
  const auto nbytes = static_cast<size_t>(logits.numel()) * logits.element_size();
  const GradBuffer buffer = acquire_grad_buffer(nbytes);
  if (buffer.data == nullptr) {
    return at::empty(logits.sizes(), logits.options());
  }
  return at::from_blob(
      buffer.data, logits.sizes(), [buffer](void*) { give_back_grad_buffer(buffer); },
      logits.options());
}

int64_t release_grad_cache_op() { return static_cast<int64_t>(release_grad_cache()); }

// Device backends: the same op bodies call either the OpenMP or the CUDA kernels.
struct CpuBackend {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static Tensor empty_grad(const Tensor& logits) { return empty_grad_cpu(logits); }
  template <typename T>
  static void grpo(const T* r, int64_t n, GroupLayout groups, TokenLayout tokens,
                   AdvantageOptions options, const AdvantageOutputs<T>& out, at::Device) {
    run_checked([&] { grpo_advantage(r, n, groups, tokens, options, out, at::get_num_threads()); });
  }
  template <typename T>
  static void forward(const T* x, LogitsShape s, const int64_t* y, double temp, acc_t<T>* logp,
                      acc_t<T>* lse, acc_t<T>* ent) {
    run_checked([&] {
      token_logprob_forward(x, s, y, temp, logp, lse, ent, at::get_num_threads());
    });
  }
  template <typename T>
  static void partials(const T* x, LogitsShape s, const int64_t* y, int64_t start, double temp,
                       const LogprobPartials<acc_t<T>>& out) {
    run_checked([&] { token_logprob_partials(x, s, y, start, temp, out, at::get_num_threads()); });
  }
  template <typename T>
  static void backward(const T* x, LogitsShape s, const int64_t* y, int64_t start, double temp,
                       const acc_t<T>* lse, const LogprobGradCoefs<acc_t<T>>& c, T* g,
                       int64_t g_stride) {
    run_checked([&] {
      token_logprob_backward(x, s, y, start, temp, lse, c, g, g_stride, at::get_num_threads());
    });
  }
};

#ifdef OPENR1_MEGA_WITH_CUDA
void cuda_check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "openr1_mega CUDA kernel failed: ", cudaGetErrorString(err));
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static Tensor empty_grad(const Tensor& logits) {
    return at::empty(logits.sizes(), logits.options());
  }
  static cuda::Rows rows(LogitsShape s) { return {s.rows, s.cols, s.row_stride}; }
  template <typename T>
  static void grpo(const T* r, int64_t n, GroupLayout groups, TokenLayout tokens,
                   AdvantageOptions options, const AdvantageOutputs<T>& out, at::Device device) {
    const cuda::AdvantageArgs args{n, groups.index, groups.group_size, groups.num_groups,
                                   static_cast<int>(options.scale), options.eps, options.unbiased,
                                   tokens.index, tokens.mask, tokens.num_tokens};
    Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::grpo_advantage_workspace_bytes(groups.num_groups))},
        at::TensorOptions().dtype(at::kByte).device(device));
    cuda_check(cuda::grpo_advantage(r, args, out.advantages, out.token_advantages,
                                    out.group_mean, out.group_std, out.num_zero_std,
                                    workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  }
  template <typename T>
  static void forward(const T* x, LogitsShape s, const int64_t* y, double temp, acc_t<T>* logp,
                      acc_t<T>* lse, acc_t<T>* ent) {
    cuda_check(cuda::token_logprob_forward(x, rows(s), y, temp, logp, lse, ent,
                                           c10::cuda::getCurrentCUDAStream()));
  }
  template <typename T>
  static void partials(const T* x, LogitsShape s, const int64_t* y, int64_t start, double temp,
                       const LogprobPartials<acc_t<T>>& o) {
    cuda_check(cuda::token_logprob_partials(x, rows(s), y, start, temp, o.max, o.sumexp, o.wsum,
                                            o.target_z, c10::cuda::getCurrentCUDAStream()));
  }
  template <typename T>
  static void backward(const T* x, LogitsShape s, const int64_t* y, int64_t start, double temp,
                       const acc_t<T>* lse, const LogprobGradCoefs<acc_t<T>>& c, T* g,
                       int64_t g_stride) {
    cuda_check(cuda::token_logprob_backward(x, rows(s), y, start, temp, lse, c.target, c.p,
                                            c.plogp, g, g_stride,
                                            c10::cuda::getCurrentCUDAStream()));
  }
};
#endif

LogitsShape shape_of(const Tensor& logits) {
  return {logits.size(0), logits.size(1), logits.size(0) > 1 ? logits.stride(0) : logits.size(1)};
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature: must be a finite number > 0, got ", temperature);
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> token_logprob_fwd(const Tensor& logits, const Tensor& targets,
                                                     double temperature, bool with_entropy) {
  check_logits(logits, targets);
  const typename Backend::Guard guard(logits.device());
  check_temperature(temperature);
  const Tensor y = targets.contiguous();
  const int64_t n = logits.size(0);
  Tensor logp = empty_rows(logits, n), lse = empty_rows(logits, n);
  Tensor entropy = empty_rows(logits, with_entropy ? n : 0);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    Backend::forward(reinterpret_cast<const T*>(logits.const_data_ptr()), shape_of(logits),
                     y.const_data_ptr<int64_t>(), temperature, logp.data_ptr<A>(),
                     lse.data_ptr<A>(), data_or_null<A>(entropy, with_entropy));
  });
  return {logp, lse, entropy};
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> token_logprob_partials_op(
    const Tensor& logits, const Tensor& targets, int64_t vocab_start, double temperature,
    bool with_entropy) {
  check_logits(logits, targets);
  const typename Backend::Guard guard(logits.device());
  check_temperature(temperature);
  TORCH_CHECK_VALUE(vocab_start >= 0, "vocab_start: must be >= 0, got ", vocab_start);
  const Tensor y = targets.contiguous();
  const int64_t n = logits.size(0);
  Tensor max = empty_rows(logits, n), sumexp = empty_rows(logits, n);
  Tensor wsum = empty_rows(logits, with_entropy ? n : 0), target_z = empty_rows(logits, n);
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const LogprobPartials<A> out{max.data_ptr<A>(), sumexp.data_ptr<A>(),
                                 data_or_null<A>(wsum, with_entropy), target_z.data_ptr<A>()};
    Backend::partials(reinterpret_cast<const T*>(logits.const_data_ptr()), shape_of(logits),
                      y.const_data_ptr<int64_t>(), vocab_start, temperature, out);
  });
  return {max, sumexp, wsum, target_z};
}

// Writes grad_logits into `grad` (a fresh tensor, or logits itself for the in-place form).
template <typename Backend>
void token_logprob_grad_into(const Tensor& logits, const Tensor& targets, int64_t vocab_start,
                             double temperature, const Tensor& lse, const Tensor& coef_target,
                             const Tensor& coef_p, const OptTensor& coef_plogp, Tensor& grad) {
  check_logits(logits, targets);
  const typename Backend::Guard guard(logits.device());
  check_temperature(temperature);
  const Tensor y = targets.contiguous();
  const Tensor lse_c = checked_row_vector(lse, "lse", logits);
  const Tensor a = checked_row_vector(coef_target, "coef_target", logits);
  const Tensor b = checked_row_vector(coef_p, "coef_p", logits);
  const bool has_c = coef_plogp.has_value();
  const Tensor c = has_c ? checked_row_vector(*coef_plogp, "coef_plogp", logits) : Tensor();
  const LogitsShape shape = shape_of(logits);
  const int64_t grad_stride = grad.is_same(logits) ? shape.row_stride : shape.cols;
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const LogprobGradCoefs<A> coefs{a.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                    has_c ? c.const_data_ptr<A>() : nullptr};
    Backend::backward(reinterpret_cast<const T*>(logits.const_data_ptr()), shape,
                      y.const_data_ptr<int64_t>(), vocab_start, temperature,
                      lse_c.const_data_ptr<A>(), coefs, reinterpret_cast<T*>(grad.data_ptr()),
                      grad_stride);
  });
}

template <typename Backend>
Tensor token_logprob_bwd(const Tensor& logits, const Tensor& targets, int64_t vocab_start,
                         double temperature, const Tensor& lse, const Tensor& coef_target,
                         const Tensor& coef_p, const OptTensor& coef_plogp) {
  Tensor grad = Backend::empty_grad(logits);
  token_logprob_grad_into<Backend>(logits, targets, vocab_start, temperature, lse, coef_target,
                                   coef_p, coef_plogp, grad);
  return grad;
}

// In-place backward: the gradient overwrites the logits (no [N, V] allocation at all).
template <typename Backend>
void token_logprob_bwd_(Tensor& logits, const Tensor& targets, int64_t vocab_start,
                        double temperature, const Tensor& lse, const Tensor& coef_target,
                        const Tensor& coef_p, const OptTensor& coef_plogp) {
  token_logprob_grad_into<Backend>(logits, targets, vocab_start, temperature, lse, coef_target,
                                   coef_p, coef_plogp, logits);
}


void check_token_layout(const Tensor& rewards, const OptTensor& token_index,
                        const OptTensor& response_mask) {
  TORCH_CHECK_VALUE(token_index.has_value() == response_mask.has_value(),
                    "response_mask: token_index and response_mask must be given together");
  if (!token_index.has_value()) return;
  TORCH_CHECK_VALUE(token_index->dim() == 1 && token_index->scalar_type() == at::kLong,
                    "token_index: expected a 1-D int64 tensor, got ", token_index->scalar_type(),
                    " of shape ", token_index->sizes());
  TORCH_CHECK_VALUE(response_mask->dim() == 1 && response_mask->scalar_type() == at::kBool &&
                        response_mask->size(0) == token_index->size(0),
                    "response_mask: expected a bool tensor of shape [", token_index->size(0),
                    "], got ", response_mask->scalar_type(), " of shape ",
                    response_mask->sizes());
  TORCH_CHECK_VALUE(token_index->device() == rewards.device() &&
                        response_mask->device() == rewards.device(),
                    "token_index: token_index and response_mask must be on ", rewards.device());
}

void check_groups(const Tensor& rewards, const OptTensor& group_index, int64_t group_size,
                  int64_t num_groups) {
  TORCH_CHECK_VALUE(num_groups >= 0, "num_groups: must be >= 0, got ", num_groups);
  if (group_index.has_value()) {
    TORCH_CHECK_VALUE(group_index->dim() == 1 && group_index->size(0) == rewards.size(0) &&
                          group_index->scalar_type() == at::kLong,
                      "group_index: expected an int64 tensor of shape [", rewards.size(0),
                      "], got ", group_index->scalar_type(), " of shape ", group_index->sizes());
    TORCH_CHECK_VALUE(group_index->device() == rewards.device(), "group_index: must be on ",
                      rewards.device());
  } else {
    TORCH_CHECK_VALUE(group_size >= 1 && group_size * num_groups == rewards.size(0),
                      "group_size: ", rewards.size(0), " rewards do not split into ", num_groups,
                      " groups of ", group_size);
  }
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grpo_advantage_op(
    const Tensor& rewards, const OptTensor& group_index, int64_t group_size, int64_t num_groups,
    c10::string_view scale, double eps, bool unbiased, const OptTensor& token_index,
    const OptTensor& response_mask) {
  TORCH_CHECK_VALUE(rewards.dim() == 1, "rewards: expected a 1-D tensor, got shape ",
                    rewards.sizes());
  TORCH_CHECK_VALUE(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
                    "rewards: dtype must be float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps: must be a finite number >= 0, got ",
                    eps);
  check_groups(rewards, group_index, group_size, num_groups);
  check_token_layout(rewards, token_index, response_mask);
  AdvantageScale parsed = AdvantageScale::kGroup;
  run_checked([&] { parsed = parse_advantage_scale(std::string(scale).c_str()); });
  const typename Backend::Guard guard(rewards.device());
  const Tensor r = rewards.contiguous();
  const Tensor index = group_index.has_value() ? group_index->contiguous() : Tensor();
  const Tensor tok = token_index.has_value() ? token_index->contiguous() : Tensor();
  const Tensor mask = response_mask.has_value() ? response_mask->contiguous() : Tensor();
  const int64_t num_tokens = tok.defined() ? tok.size(0) : 0;
  Tensor adv = at::empty_like(r), token_adv = at::empty({num_tokens}, r.options());
  Tensor mean = at::empty({num_groups}, r.options()), sd = at::empty({num_groups}, r.options());
  Tensor zero_std = at::zeros({}, r.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "grpo_advantage", [&] {
    const GroupLayout groups{index.defined() ? index.const_data_ptr<int64_t>() : nullptr,
                             group_size, num_groups};
    const TokenLayout tokens{tok.defined() ? tok.const_data_ptr<int64_t>() : nullptr,
                             mask.defined() ? mask.const_data_ptr<bool>() : nullptr, num_tokens};
    const AdvantageOutputs<scalar_t> out{adv.data_ptr<scalar_t>(), token_adv.data_ptr<scalar_t>(),
                                         mean.data_ptr<scalar_t>(), sd.data_ptr<scalar_t>(),
                                         zero_std.data_ptr<int64_t>()};
    Backend::grpo(r.const_data_ptr<scalar_t>(), r.size(0), groups, tokens,
                  AdvantageOptions{parsed, eps, unbiased}, out, r.device());
  });
  return {adv, token_adv, mean, sd, zero_std};
}

std::string cpu_isa_op() {
  std::string name;
  run_checked([&] { name = cpu_isa_name(active_cpu_isa()); });
  return name;
}

}  // namespace
}  // namespace openr1_mega

TORCH_LIBRARY(openr1_mega, m) {
  m.def("token_logprob_fwd(Tensor logits, Tensor targets, float temperature, bool with_entropy)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("token_logprob_partials(Tensor logits, Tensor targets, int vocab_start, "
        "float temperature, bool with_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("token_logprob_bwd(Tensor logits, Tensor targets, int vocab_start, float temperature, "
        "Tensor lse, Tensor coef_target, Tensor coef_p, Tensor? coef_plogp) -> Tensor");
  m.def("token_logprob_bwd_(Tensor(a!) logits, Tensor targets, int vocab_start, "
        "float temperature, Tensor lse, Tensor coef_target, Tensor coef_p, Tensor? coef_plogp) "
        "-> ()");
  m.def("grpo_advantage(Tensor rewards, Tensor? group_index, int group_size, int num_groups, "
        "str scale, float eps, bool unbiased, Tensor? token_index, Tensor? response_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_isa() -> str", &openr1_mega::cpu_isa_op);
  m.def("release_grad_cache() -> int", &openr1_mega::release_grad_cache_op);
}

TORCH_LIBRARY_IMPL(openr1_mega, CPU, m) {
  using openr1_mega::CpuBackend;
  m.impl("token_logprob_fwd", &openr1_mega::token_logprob_fwd<CpuBackend>);
  m.impl("token_logprob_partials", &openr1_mega::token_logprob_partials_op<CpuBackend>);
  m.impl("token_logprob_bwd", &openr1_mega::token_logprob_bwd<CpuBackend>);
  m.impl("token_logprob_bwd_", &openr1_mega::token_logprob_bwd_<CpuBackend>);
  m.impl("grpo_advantage", &openr1_mega::grpo_advantage_op<CpuBackend>);
}

#ifdef OPENR1_MEGA_WITH_CUDA
TORCH_LIBRARY_IMPL(openr1_mega, CUDA, m) {
  using openr1_mega::CudaBackend;
  m.impl("token_logprob_fwd", &openr1_mega::token_logprob_fwd<CudaBackend>);
  m.impl("token_logprob_partials", &openr1_mega::token_logprob_partials_op<CudaBackend>);
  m.impl("token_logprob_bwd", &openr1_mega::token_logprob_bwd<CudaBackend>);
  m.impl("token_logprob_bwd_", &openr1_mega::token_logprob_bwd_<CudaBackend>);
  m.impl("grpo_advantage", &openr1_mega::grpo_advantage_op<CudaBackend>);
}
#endif
