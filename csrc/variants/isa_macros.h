// The macros `-mavx2 -mfma -mf16c` (SPECKLE_ISA_AVX2) and `-mavx512{f,dq,bw,vl}` too
// (SPECKLE_ISA_AVX512) would define, for a variant's translation unit that sets its ISA by
// `#pragma GCC target`: g++ compiles the code for the target but, in C++, does not define these
// under the pragma (it does in C; checked with GCC 12), and headers test them: Sleef's vector
// declarations that ATen's 256-bit vectors call, and noise_lanes.h. Included after the pragma
// and before any header. (__BIGGEST_ALIGNMENT__ and __FP_FAST_FMA* are left alone.)
#pragma once

#if defined(SPECKLE_ISA_AVX2)
#ifndef __SSE3__
#define __SSE3__ 1
#endif
#ifndef __SSSE3__
#define __SSSE3__ 1
#endif
#ifndef __SSE4_1__
#define __SSE4_1__ 1
#endif
#ifndef __SSE4_2__
#define __SSE4_2__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif  // SPECKLE_ISA_AVX2

#if defined(SPECKLE_ISA_AVX512)
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#endif  // SPECKLE_ISA_AVX512
