// Philox and Box-Muller of the CPU noise kernel, written once over SIMD lanes: Lanes<8> (the AVX2
// and AVX-512 variants) and Lanes<16> (the AVX-512 variant). Both widths run the same operations
// in the same order on each lane, so they give the same bits (tested).
//
// Why 16 lanes: Philox is ~60% of the kernel's instructions, and AVX-512 does a round's two
// 3-way XORs in one instruction each and a 32-bit low product in one; measured on this
// project's CPU (AMD EPYC, Zen 4), Philox alone took 2.7 ns an element on 8 lanes and 1.85 ns
// on 16.
//
// The log and cos are short polynomials for the arguments they get here (measured in float64
// over 4e6 points: <= 1.7 ulp for the log, <= 2 ulp for the sin polynomial); Sleef's
// general-purpose functions took ~60% of this kernel's time before. The tests' tolerance
// against the documented stream is derived from these errors (tests/test_ext_noise.py).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define SPECKLE_NOISE_LANES8 1
#include <immintrin.h>

#include <cstdint>

#include "../include/philox.h"

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define SPECKLE_NOISE_LANES16 1
#endif

namespace speckle::cpu::CPU_CAPABILITY::lanes {

template <int W>
struct Lanes;

template <>
struct Lanes<8> {
  using F = __m256;
  using U = __m256i;
  using M = __m256;  // a comparison: all ones where true
  static F set1(float x) { return _mm256_set1_ps(x); }
  static U set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static U zero() { return _mm256_setzero_si256(); }
  static U load(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static M greater(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M greater_equal(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  static uint32_t to_bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static U plus_one_where(U a, M m) { return _mm256_sub_epi32(a, _mm256_castps_si256(m)); }
  static U bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(U a) { return _mm256_castsi256_ps(a); }
  static F to_float(U a) { return _mm256_cvtepi32_ps(a); }
  static U bit_and(U a, U b) { return _mm256_and_si256(a, b); }
  static U bit_or(U a, U b) { return _mm256_or_si256(a, b); }
  static U xor3(U a, U b, U c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static U xor2(U a, U b) { return _mm256_xor_si256(a, b); }
  static U sub32(U a, U b) { return _mm256_sub_epi32(a, b); }
  static U shift_right32(U a, int n) { return _mm256_srli_epi32(a, n); }
  static U shift_right_signed32(U a, int n) { return _mm256_srai_epi32(a, n); }
  // (hi, lo) 32-bit halves of b * mul per 32-bit lane: _mm256_mul_epu32 multiplies the even
  // lanes into 64-bit products, the odd lanes are shifted down first.
  static void mulhilo(U mul, U b, U& hi, U& lo) {
    const U even = _mm256_mul_epu32(b, mul);
    const U odd = _mm256_mul_epu32(_mm256_srli_epi64(b, 32), mul);
    lo = _mm256_mullo_epi32(b, mul);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
};

#if defined(SPECKLE_NOISE_LANES16)
template <>
struct Lanes<16> {
  using F = __m512;
  using U = __m512i;
  using M = __mmask16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static U set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static U zero() { return _mm512_setzero_si512(); }
  static U load(const uint32_t* p) { return _mm512_load_si512(p); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, F v) { _mm512_store_ps(p, v); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static M greater(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M greater_equal(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  static uint32_t to_bits(M m) { return static_cast<uint32_t>(m); }
  static U plus_one_where(U a, M m) { return _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(1)); }
  static U bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(U a) { return _mm512_castsi512_ps(a); }
  static F to_float(U a) { return _mm512_cvtepi32_ps(a); }
  static U bit_and(U a, U b) { return _mm512_and_si512(a, b); }
  static U bit_or(U a, U b) { return _mm512_or_si512(a, b); }
  static U xor3(U a, U b, U c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static U xor2(U a, U b) { return _mm512_xor_si512(a, b); }
  static U sub32(U a, U b) { return _mm512_sub_epi32(a, b); }
  static U shift_right32(U a, int n) { return _mm512_srli_epi32(a, n); }
  static U shift_right_signed32(U a, int n) { return _mm512_srai_epi32(a, n); }
  static void mulhilo(U mul, U b, U& hi, U& lo) {
    const U even = _mm512_mul_epu32(b, mul);
    const U odd = _mm512_mul_epu32(_mm512_srli_epi64(b, 32), mul);
    lo = _mm512_mullo_epi32(b, mul);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
};
#endif

// ln(u) for u in [1e-7, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
// ln(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: the atanh series to s^11 leaves
// < 2e-9 relative; e * ln 2 in two parts (e * LN2_HI is exact for |e| < 2^7).
template <class L>
inline typename L::F log_unit(typename L::F u) {
  using F = typename L::F;
  const auto bits = L::bits(u);
  auto e = L::sub32(L::shift_right32(bits, 23), L::set1(127u));
  F m = L::from_bits(L::bit_or(L::bit_and(bits, L::set1(0x007FFFFFu)), L::set1(0x3F800000u)));
  const auto big = L::greater(m, L::set1(1.41421356f));
  m = L::select(big, L::mul(m, L::set1(0.5f)), m);
  e = L::plus_one_where(e, big);
  const F f = L::sub(m, L::set1(1.0f));
  const F s = L::div(f, L::add(f, L::set1(2.0f)));
  const F z = L::mul(s, s);
  F p = L::fmadd(z, L::set1(1.0f / 11), L::set1(1.0f / 9));
  p = L::fmadd(z, p, L::set1(1.0f / 7));
  p = L::fmadd(z, p, L::set1(1.0f / 5));
  p = L::fmadd(z, p, L::set1(1.0f / 3));
  const F two_s = L::add(s, s);
  const F log1p = L::fmadd(L::mul(two_s, z), p, two_s);
  const F ef = L::to_float(e);
  return L::fmadd(ef, L::set1(0.693145751953125f), L::fmadd(ef, L::set1(1.428606765330187e-06f), log1p));
}

// cos(theta) = sin(x) for the float angle theta in [0, 2 pi]: x = pi/2 - theta below pi,
// theta - 3 pi/2 above, each formed as (exact difference) + (the constant's float residual), so
// x carries one rounding, as a reduction in double would. theta - Q1 is exact for theta in
// [pi, 2 pi] and P1 - theta for theta in [pi/4, pi] (Sterbenz); below pi/4 P1 - theta rounds
// once more, where cos' = -sin is small. sin(x) on [-pi/2, pi/2] is x + x^3 q(x^2), q a
// least-squares minimax fit of degree 4.
template <class L>
inline typename L::F cos_angle(typename L::F theta) {
  using F = typename L::F;
  const F below = L::add(L::sub(L::set1(1.57079637050628662109375f), theta), L::set1(-4.371139006309477e-8f));
  const F above = L::sub(L::sub(theta, L::set1(4.71238899230957031250f)), L::set1(-1.1924880638503055e-8f));
  const F x = L::select(L::greater_equal(theta, L::set1(3.14159274101257324f)), above, below);
  const F x2 = L::mul(x, x);
  F q = L::fmadd(x2, L::set1(-2.3991626463271132e-08f), L::set1(2.753129820121103e-06f));
  q = L::fmadd(x2, q, L::set1(-0.00019840984896291047f));
  q = L::fmadd(x2, q, L::set1(0.008333331905305386f));
  q = L::fmadd(x2, q, L::set1(-0.1666666716337204f));
  return L::fmadd(L::mul(x, x2), q, x);
}

// sqrt(-2 ln max(u, 1e-7)): the Box-Muller / Rayleigh radius.
template <class L>
inline typename L::F radius(typename L::F u) {
  return L::sqrt(L::mul(log_unit<L>(L::max(u, L::set1(kTinyUniform))), L::set1(-2.0f)));
}

// philox_uniform on every lane: v < 0 ? ~v : v, then scale.
template <class L>
inline typename L::F uniform(typename L::U r) {
  return L::mul(L::to_float(L::xor2(r, L::shift_right_signed32(r, 31))), L::set1(kUniformScale));
}

// Philox4x32-10 (bit-identical to philox4x32_10) of the counters (x0, x1, 0, c3) on every
// lane of V vectors, in place: x0..x3 become the output words. Round 1 is cut short: the c2
// product is 0. V > 1 interleaves independent vectors: a round's multiply-xor chain is
// latency-bound, so one vector alone leaves most of the core idle.
template <class L, int V = 1>
inline void philox_c2_zero(uint64_t seed, uint32_t c3, typename L::U* x0, typename L::U* x1,
                           typename L::U* x2, typename L::U* x3) {
  using U = typename L::U;
  const U mul_a = L::set1(kPhiloxMulA), mul_b = L::set1(kPhiloxMulB);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int v = 0; v < V; ++v) {
    L::mulhilo(mul_a, x0[v], x2[v], x3[v]);
    x2[v] = L::xor2(x2[v], L::set1(k1 ^ c3));
    x0[v] = L::xor2(x1[v], L::set1(k0));
    x1[v] = L::zero();
  }
  for (int round = 1; round < kPhiloxRounds; ++round) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    for (int v = 0; v < V; ++v) {
      U hi_a, lo_a, hi_b, lo_b;
      L::mulhilo(mul_a, x0[v], hi_a, lo_a);
      L::mulhilo(mul_b, x2[v], hi_b, lo_b);
      x0[v] = L::xor3(hi_b, x1[v], L::set1(k0));
      x2[v] = L::xor3(hi_a, x3[v], L::set1(k1));
      x1[v] = lo_b;
      x3[v] = lo_a;
    }
  }
}

// n1, n2 of the kLanes consecutive elements whose counters are (c0[l], c1[l], 0, 0):
// Philox4x32-10 (bit-identical to philox4x32_10), then Box-Muller (or Rayleigh for n1).
template <int W, int64_t kLanes>
void standard_noise_lanes(uint64_t seed, const uint32_t* c0, const uint32_t* c1, bool rayleigh,
                          float* n1, float* n2) {
  using L = Lanes<W>;
  using U = typename L::U;
  using F = typename L::F;
  const F two_pi = L::set1(kTwoPi);
  for (int64_t l = 0; l < kLanes; l += W) {
    U x0 = L::load(c0 + l), x1 = L::load(c1 + l), x2, x3;
    philox_c2_zero<L>(seed, 0, &x0, &x1, &x2, &x3);
    const F rho0 = radius<L>(uniform<L>(x0));
    const F a = rayleigh ? L::mul(L::sub(rho0, L::set1(kRayleighMean)), L::set1(kRayleighInvStd))
                         : L::mul(rho0, cos_angle<L>(L::mul(two_pi, uniform<L>(x1))));
    const F b = L::mul(radius<L>(uniform<L>(x2)), cos_angle<L>(L::mul(two_pi, uniform<L>(x3))));
    L::store(n1 + l, a);
    L::store(n2 + l, b);
  }
}

}  // namespace speckle::cpu::CPU_CAPABILITY::lanes
#endif  // AVX2 and FMA
