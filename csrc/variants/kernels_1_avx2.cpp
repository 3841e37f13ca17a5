// The AVX2 variant: AVX2 + FMA + F16C (Haswell, Zen 1 and later). at::vec's 256-bit vectors
// (CPU_CAPABILITY_AVX2) and the 8-lane Philox paths of noise_lanes.h.
//
// The ISA is set by a pragma, not by flags, so that one set of compiler flags builds the whole
// extension (setuptools and torch.utils.cpp_extension.load alike) and nothing outside this file
// is compiled for AVX2. It must come before any include: every function defined after it, ATen's
// and the standard library's inline ones included, is compiled for the target; isa_macros.h then
// defines the macros the flags would have (g++ does not, under the pragma, in C++). Only x86-64
// with GCC or Clang builds it; cpu_dispatch.cpp checks the same condition.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)  // (not tried here: this project's builds use g++)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SPECKLE_ISA_AVX2 1
#define SPECKLE_ISA_NAME "avx2"
#include "isa_macros.h"
#include "kernels_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
