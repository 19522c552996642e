// Which x86 SIMD level the CPU kernels run: the best this CPU supports, capped by the
// environment variable OPENR1_MEGA_CPU_ISA (avx512 | avx2 | baseline). The cap lets one machine
// run, test and time every path, e.g. the AVX2 path on an AVX-512 CPU.
//
// avx512: AVX-512 F/BW/DQ/VL (16 floats a vector); avx2: AVX2 + FMA + F16C (8 floats);
// baseline: the compiler's auto-vectorised loops for the build's default target (SSE2 on
// x86-64), also the only level off x86 or with compilers other than GCC.
#pragma once

#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define OPENR1_MEGA_X86_SIMD 1
#else
#define OPENR1_MEGA_X86_SIMD 0
#endif

namespace openr1_mega {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// The best level this CPU (and OS, which must save the vector registers) and build support.
inline CpuIsa detected_cpu_isa() {
#if OPENR1_MEGA_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

// The level the kernels use now: detected_cpu_isa(), lowered to OPENR1_MEGA_CPU_ISA when that
// is set and lower. Read at every kernel call (not once), so a test can switch paths.
// Throws std::invalid_argument naming the variable for a value that is not a level.
inline CpuIsa active_cpu_isa() {
  const CpuIsa best = detected_cpu_isa();
  const char* env = std::getenv("OPENR1_MEGA_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    return best;
  }
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (std::strcmp(env, cpu_isa_name(isa)) == 0) {
      return static_cast<int>(isa) < static_cast<int>(best) ? isa : best;
    }
  }
  check_arg(false, "OPENR1_MEGA_CPU_ISA",
            "expected avx512, avx2 or baseline, got '" + std::string(env) + "'");
  return best;
}

}  // namespace openr1_mega
