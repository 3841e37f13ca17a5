// Vector helpers of the CPU kernels (ATen's Vectorized<float>: 8 lanes in the AVX2 and AVX-512
// variants, plain arrays of 8 the compiler vectorises for SSE2 in the DEFAULT one).
//
// The BatchRenorm passes step kW values at a time as two fp32 vectors, which is one 16-bit
// vector: fp16/bf16 are widened on load and rounded once on store. A step of n < kW values (a
// tail) loads only n values, the rest reading as 0, and stores only n.
#pragma once

// Kernel code is compiled only through a variant's translation unit, which sets the ISA and
// CPU_CAPABILITY (the namespace of ATen's vectors and of this code) first.
#if !defined(CPU_CAPABILITY)
#error "CPU kernel code is compiled through csrc/variants/kernels_*.cpp only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();
constexpr int64_t kW = 2 * kF;  // values per step: two fp32 vectors (one 16-bit vector)

// kW values at p as two fp32 vectors; n < kW loads only n (the rest reads as 0).
template <typename T>
inline void load2(const T* p, fVec& a, fVec& b, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW) {
      a = fVec::loadu(p);
      b = fVec::loadu(p + kF);
    } else {
      a = fVec::loadu(p, std::min(n, kF));
      b = n > kF ? fVec::loadu(p + kF, n - kF) : fVec(0.0f);
    }
  } else {
    auto v = n == kW ? at::vec::Vectorized<T>::loadu(p) : at::vec::Vectorized<T>::loadu(p, n);
    std::tie(a, b) = at::vec::convert_to_float<T>(v);
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b, int64_t n = kW) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW) {
      a.store(p);
      b.store(p + kF);
    } else {
      a.store(p, std::min(n, kF));
      if (n > kF) b.store(p + kF, n - kF);
    }
  } else {
    auto v = at::vec::convert_from_float<T>(a, b);
    if (n == kW) v.store(p); else v.store(p, n);
  }
}

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, v);
}

// Zero the lanes at or past n of the pair (a, b).
inline void keep_first(fVec& a, fVec& b, int64_t n) {
  const fVec zero(0.0f);
  a = fVec::set(zero, a, std::min(n, kF));
  b = n > kF ? fVec::set(zero, b, n - kF) : zero;
}

}  // namespace speckle::cpu::CPU_CAPABILITY
