// Run-time SIMD dispatch. Hot loops live in *_kernels.h templates compiled twice: once in a
// *_generic.cpp (baseline x86-64 / any CPU) and once in a *_avx2.cpp built with -mavx2 -mfma -mf16c.
// Distributed builds never use -march=native (DESIGN.md section 2).
#pragma once

namespace fi {
inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}
}  // namespace fi
