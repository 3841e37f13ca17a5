// The AVX-512 variant: AVX2's set plus AVX-512 F, DQ, BW and VL (Skylake-SP, Zen 4 and later).
// at::vec stays at 256 bits (CPU_CAPABILITY_AVX2) and so does the compiler's own vectorisation
// (prefer-vector-width=256); AVX-512 serves the explicit lanes: the 16-lane Philox of
// noise_lanes.h (one instruction for a round's 3-way XORs, 16 low products at once) and the
// dropout mask's masked moves. This was the fastest configuration when one flag set built the
// whole extension (benchmarks/results/cpu-2026-12-03/ has the dispatch A/B). Its namespace is
// AVX512_256, not AVX512: at::vec::AVX512 is ATen's name for its 512-bit vectors, which these
// are not. See kernels_1_avx2.cpp for why a pragma.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)  // (not tried here: this project's builds use g++)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl"))), \
                             apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=256")
#endif
#define CPU_CAPABILITY AVX512_256
#define CPU_CAPABILITY_AVX2
#define SPECKLE_ISA_AVX2 1
#define SPECKLE_ISA_AVX512 1
#define SPECKLE_ISA_NAME "avx512"
#include "isa_macros.h"
#include "kernels_body.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
