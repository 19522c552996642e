// The CUDA kernels against the CPU kernels (which test_token_logprob and test_grpo_advantage
// check against float64). Needs a CUDA device: without one it prints why and exits 77, which
// ctest reports as skipped. Odd shapes on purpose: V not a multiple of the 16-byte vector, a
// row stride that breaks 16-byte alignment, G = 1 and G = 1000.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda/kernels.h"
#include "grpo_advantage.h"
#include "token_logprob.h"

using namespace openr1_mega;

namespace {

#define CUDA_OK(expr) CHECK((expr) == cudaSuccess)

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* ptr = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&ptr), host.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return ptr;
}

template <typename T>
std::vector<T> to_host(const T* ptr, size_t n) {
  std::vector<T> host(n);
  CUDA_OK(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <typename T>
T make(float x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return from_float<T>(x);
  }
}

template <typename T>
void check_token_logprob(int64_t n, int64_t v, int64_t stride, double tol) {
  using A = acc_t<T>;
  std::mt19937 gen(static_cast<uint32_t>(v));
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<T> x(n * stride);
  for (auto& e : x) e = make<T>(dist(gen));
  std::vector<int64_t> t(n);
  for (int64_t r = 0; r < n; ++r) t[r] = (r * 977) % v;
  std::vector<A> logp(n), lse(n), ent(n), a(n, A(1)), b(n, A(-0.5)), c(n, A(0.25));
  token_logprob_forward(x.data(), {n, v, stride}, t.data(), 0.9, logp.data(), lse.data(),
                        ent.data(), 1);
  std::vector<T> grad(n * v);
  token_logprob_backward(x.data(), {n, v, stride}, t.data(), 0, 0.9, lse.data(),
                         {a.data(), b.data(), c.data()}, grad.data(), v, 1);

  T* dx = to_device(x);
  int64_t* dt = to_device(t);
  A *dlogp = to_device(logp), *dlse = to_device(lse), *dent = to_device(ent);
  A *da = to_device(a), *db = to_device(b), *dc = to_device(c);
  T* dgrad = to_device(grad);
  CUDA_OK(cuda::token_logprob_forward(dx, {n, v, stride}, dt, 0.9, dlogp, dlse, dent, nullptr));
  CUDA_OK(cuda::token_logprob_backward(dx, {n, v, stride}, dt, 0, 0.9, dlse, da, db, dc, dgrad,
                                       v, nullptr));
  const auto glogp = to_host(dlogp, n), gent = to_host(dent, n);
  const auto ggrad = to_host(dgrad, n * v);
  for (int64_t r = 0; r < n; ++r) {
    CHECK_CLOSE(glogp[r], logp[r], tol, tol);
    CHECK_CLOSE(gent[r], ent[r], tol, tol);
  }
  for (int64_t i = 0; i < n * v; ++i) {
    CHECK_CLOSE(to_float(ggrad[i]), to_float(grad[i]), 10 * tol, 10 * tol);
  }
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dt), static_cast<void*>(dlogp),
                  static_cast<void*>(dlse), static_cast<void*>(dent), static_cast<void*>(da),
                  static_cast<void*>(db), static_cast<void*>(dc), static_cast<void*>(dgrad)}) {
    CUDA_OK(cudaFree(p));
  }
}

void check_grpo(int64_t k, int64_t g, bool indexed, AdvantageScale scale) {
  const int64_t n = k * g;
  std::mt19937 gen(static_cast<uint32_t>(n));
  std::uniform_int_distribution<int> d(0, 2);
  std::vector<float> r(n);
  for (auto& e : r) e = 0.5f * d(gen);
  std::vector<int64_t> index(n);
  for (int64_t i = 0; i < n; ++i) index[i] = (i * 7) % k;
  const AdvantageOptions o{scale, 1e-6, true};
  std::vector<float> adv(n), mean(k), sd(k);
  int64_t zero = 0;
  const GroupLayout layout{indexed ? index.data() : nullptr, g, k};
  grpo_advantage(r.data(), n, layout, {nullptr, nullptr, 0}, o,
                 AdvantageOutputs<float>{adv.data(), nullptr, mean.data(), sd.data(), &zero}, 1);

  float *dr = to_device(r), *dadv = to_device(adv), *dmean = to_device(mean);
  float* dsd = to_device(sd);
  int64_t* dindex = to_device(index);
  int64_t* dzero = to_device(std::vector<int64_t>{-1});
  void* work = nullptr;
  CUDA_OK(cudaMalloc(&work, cuda::grpo_advantage_workspace_bytes(k)));
  const cuda::AdvantageArgs args{n, indexed ? dindex : nullptr, g, k, static_cast<int>(scale),
                                 1e-6, true, nullptr, nullptr, 0};
  CUDA_OK(cuda::grpo_advantage(dr, args, dadv, static_cast<float*>(nullptr), dmean, dsd, dzero,
                               work, nullptr));
  const auto gadv = to_host(dadv, n), gmean = to_host(dmean, k), gsd = to_host(dsd, k);
  for (int64_t i = 0; i < n; ++i) CHECK_CLOSE(gadv[i], adv[i], 1e-5, 1e-6);
  for (int64_t j = 0; j < k; ++j) CHECK_CLOSE(gmean[j], mean[j], 1e-6, 1e-7);
  for (int64_t j = 0; j < k; ++j) CHECK_CLOSE(gsd[j], sd[j], 1e-6, 1e-7);
  CHECK(to_host(dzero, 1)[0] == zero);
  for (void* p : {static_cast<void*>(dr), static_cast<void*>(dadv), static_cast<void*>(dmean),
                  static_cast<void*>(dsd), static_cast<void*>(dindex), static_cast<void*>(dzero),
                  work}) {
    CUDA_OK(cudaFree(p));
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_cuda_kernels: no CUDA device, skipped\n");
    return 77;
  }
  check_token_logprob<float>(7, 5003, 5003, 2e-5);
  check_token_logprob<bf16_t>(9, 151936, 151936, 2e-5);
  check_token_logprob<bf16_t>(5, 1001, 1003, 2e-5);
  check_token_logprob<fp16_t>(3, 37, 37, 2e-5);
  check_token_logprob<double>(2, 999, 999, 1e-12);
  for (auto scale : {AdvantageScale::kGroup, AdvantageScale::kBatch, AdvantageScale::kNone}) {
    check_grpo(1000, 16, false, scale);
    check_grpo(7, 1000, false, scale);
    check_grpo(50, 1, false, scale);
    check_grpo(333, 5, true, scale);
  }
  return check::finish("test_cuda_kernels");
}
