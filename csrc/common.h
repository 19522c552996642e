// Shared pieces of the CPU kernels: 16-bit float storage types and their exact conversions,
// a vectorisable exp, argument checks that name the argument, and a force-inline macro.
//
// Plain C++17 with no torch or Python: the kernels are built both into the torch extension
// (through csrc/bindings.cpp) and into the standalone library that CMake builds and ctest runs.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace openr1_mega {

// Storage-only 16-bit float types; layout-compatible with c10::BFloat16 and c10::Half.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Accumulation type of a logits type: double for double, float for everything else.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

// Throws std::invalid_argument("<arg>: <what>") unless `ok`; the bindings turn it into a
// Python ValueError, so every bad input names the argument that is wrong.
inline void check_arg(bool ok, const char* arg, const std::string& what) {
  if (!ok) {
    throw std::invalid_argument(std::string(arg) + ": " + what);
  }
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// IEEE half -> float without branches (same algorithm as c10::detail::fp16_ieee_to_fp32_value),
// so the loop that calls it auto-vectorises.
inline float to_float(fp16_t x) {
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even, NaN kept quiet (matches c10::BFloat16's rounding).
template <>
inline bf16_t from_float<bf16_t>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded)};
}

// float -> IEEE half, round to nearest even (c10::detail::fp16_ieee_from_fp32_value).
template <>
inline fp16_t from_float<fp16_t>(float x) {
  float base = (bits_to_float(float_to_bits(x) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return fp16_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Stores an accumulator value as T (identity for float and double).
template <typename T>
inline T from_acc(acc_t<T> x) {
  if constexpr (sizeof(T) == sizeof(acc_t<T>)) {
    return x;
  } else {
    return from_float<T>(x);
  }
}

// exp(x) for float x <= 88 in straight-line code (Cephes polynomial, ~1 ulp) so that loops
// calling it vectorise. The kernels only pass x <= 0 (a logit minus the row max or the row
// log-sum-exp), so there is no upper clamp. Inputs below about -87.7 return exactly 0; NaN
// stays NaN.
inline float exp_fast(float x) {
  x = x < -88.0f ? -88.0f : x;
  const float shifter = 0x1.8p23f;  // adding it rounds x*log2(e) to an integer in the mantissa
  const float kn = x * 1.44269504088896341f + shifter;
  const float n = kn - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the integer sitting in kn's low mantissa bits; n = -127 gives +0.
  const float scale = bits_to_float((float_to_bits(kn) + 127u) << 23);
  return p * scale;
}

}  // namespace openr1_mega

#if defined(__GNUC__)
#define OPENR1_MEGA_INLINE inline __attribute__((always_inline))
#else
#define OPENR1_MEGA_INLINE inline
#endif
