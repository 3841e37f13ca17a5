// Speckle noise on the CPU: the Philox stream of csrc/include/philox.h, 64 lanes at a time.
//
// Per block of 64 consecutive elements: the ten Philox rounds run on 8 lanes at a time (AVX2
// intrinsics where the build has AVX2, else a loop over lanes), the uniforms and the
// log / sqrt / cos of Box-Muller run on at::vec (Sleef, <= 1 ulp), then y is formed and
// rounded to the output dtype. Every value depends only on (seed, offset, flat index), so the
// split into parallel tasks changes nothing.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

namespace speckle::cpu {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = 64;
constexpr int64_t kTaskElements = 8192;

#if defined(__AVX2__) && defined(__FMA__) && defined(CPU_CAPABILITY_AVX2)
// Box-Muller's log and cos on 8 lanes, for the arguments they get here. They took ~60% of
// this kernel's time through Sleef's general-purpose u10 functions (torch.cos / torch.log:
// 1.3 / 1.0 ns an element on one thread here). Errors, measured in float64 over 4e6 points:
// <= 1.7 ulp (log), <= 2 ulp (sin polynomial); the tests' tolerance against the documented
// stream is derived from a few ulp (tests/test_ext_noise.py).

// ln(u) for u in [1e-7, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
// ln(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: the atanh series to s^11 leaves
// < 2e-9 relative; e * ln 2 in two parts (e * LN2_HI is exact for |e| < 2^7).
inline __m256 log_unit(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are all ones (-1): e + 1
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(f, _mm256_set1_ps(2.0f)));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_fmadd_ps(z, _mm256_set1_ps(1.0f / 11), _mm256_set1_ps(1.0f / 9));
  p = _mm256_fmadd_ps(z, p, _mm256_set1_ps(1.0f / 7));
  p = _mm256_fmadd_ps(z, p, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(z, p, _mm256_set1_ps(1.0f / 3));
  const __m256 two_s = _mm256_add_ps(s, s);
  const __m256 log1p = _mm256_fmadd_ps(_mm256_mul_ps(two_s, z), p, two_s);
  const __m256 ef = _mm256_cvtepi32_ps(e);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693145751953125f),
                         _mm256_fmadd_ps(ef, _mm256_set1_ps(1.428606765330187e-06f), log1p));
}

// cos(theta) = sin(x) for the float angle theta in [0, 2 pi]: x = pi/2 - theta below pi,
// theta - 3 pi/2 above, each formed as (exact difference) + (the constant's float residual), so
// x carries one rounding, as a reduction in double would. theta - Q1 is exact for theta in
// [pi, 2 pi] and P1 - theta for theta in [pi/4, pi] (Sterbenz); below pi/4 P1 - theta rounds
// once more, where cos' = -sin is small. sin(x) on [-pi/2, pi/2] is x + x^3 q(x^2), q a
// least-squares minimax fit of degree 4.
inline __m256 cos_angle(__m256 theta) {
  const __m256 P1 = _mm256_set1_ps(1.57079637050628662109375f), P2 = _mm256_set1_ps(-4.371139006309477e-8f);
  const __m256 Q1 = _mm256_set1_ps(4.71238899230957031250f), Q2 = _mm256_set1_ps(-1.1924880638503055e-8f);
  const __m256 below = _mm256_add_ps(_mm256_sub_ps(P1, theta), P2);
  const __m256 above = _mm256_sub_ps(_mm256_sub_ps(theta, Q1), Q2);
  const __m256 x = _mm256_blendv_ps(below, above, _mm256_cmp_ps(theta, _mm256_set1_ps(3.14159274101257324f), _CMP_GE_OQ));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.3991626463271132e-08f), _mm256_set1_ps(2.753129820121103e-06f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-0.00019840984896291047f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(0.008333331905305386f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-0.1666666716337204f));
  return _mm256_fmadd_ps(_mm256_mul_ps(x, x2), q, x);
}

inline fVec radius(const fVec& u) {  // sqrt(-2 ln max(u, 1e-7))
  const __m256 v = _mm256_max_ps(u, _mm256_set1_ps(kTinyUniform));
  return fVec(_mm256_sqrt_ps(_mm256_mul_ps(log_unit(v), _mm256_set1_ps(-2.0f))));
}

inline fVec cos_of(const fVec& theta) { return fVec(cos_angle(theta)); }
#else
inline fVec radius(const fVec& u) {  // sqrt(-2 ln max(u, 1e-7))
  return (at::vec::maximum(u, fVec(kTinyUniform)).log() * fVec(-2.0f)).sqrt();
}

inline fVec cos_of(const fVec& theta) { return theta.cos(); }
#endif

#if defined(__AVX2__)
// Philox on 8 lanes with AVX2. _mm256_mul_epu32 multiplies the even 32-bit lanes into 64-bit
// products; the odd lanes are shifted down first. Integer arithmetic: bit-identical to
// philox_round, which the compiler vectorized about half as well (the rounds were the largest
// share of this kernel's time).
inline void mulhilo8(__m256i mul, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(b, mul);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(b, 32), mul);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 uniform8(__m256i r) {  // philox_uniform on 8 lanes: v < 0 ? ~v : v, then scale
  const __m256i v = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(kUniformScale));
}

void philox_uniforms(uint64_t seed, uint32_t* c0, uint32_t* c1, float* u0, float* u1, float* u2, float* u3) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(kPhiloxMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(kPhiloxMulB));
  for (int64_t l = 0; l < kLanes; l += 8) {
    __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c0 + l));
    __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c1 + l));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    // Round 1 on the stream's counters (c0, c1, 0, 0): the c2 product is 0.
    __m256i x2, x3;
    mulhilo8(mul_a, x0, x2, x3);
    x2 = _mm256_xor_si256(x2, _mm256_set1_epi32(static_cast<int>(k1)));
    x0 = _mm256_xor_si256(x1, _mm256_set1_epi32(static_cast<int>(k0)));
    x1 = _mm256_setzero_si256();
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    for (int round = 1; round < kPhiloxRounds; ++round) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo8(mul_a, x0, hi_a, lo_a);
      mulhilo8(mul_b, x2, hi_b, lo_b);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(k0)));
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(k1)));
      x1 = lo_b;
      x3 = lo_a;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    _mm256_store_ps(u0 + l, uniform8(x0));
    _mm256_store_ps(u1 + l, uniform8(x1));
    _mm256_store_ps(u2 + l, uniform8(x2));
    _mm256_store_ps(u3 + l, uniform8(x3));
  }
}
#else
void philox_uniforms(uint64_t seed, uint32_t* c0, uint32_t* c1, float* u0, float* u1, float* u2, float* u3) {
  alignas(64) uint32_t c2[kLanes] = {}, c3[kLanes] = {};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int64_t l = 0; l < kLanes; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    u0[l] = philox_uniform(c0[l]);
    u1[l] = philox_uniform(c1[l]);
    u2[l] = philox_uniform(c2[l]);
    u3[l] = philox_uniform(c3[l]);
  }
}
#endif

// n1, n2 for elements e0 .. e0 + n - 1 (n <= kLanes).
void noise_block(uint64_t seed, uint64_t e0, int64_t n, bool rayleigh, float* n1, float* n2) {
  alignas(64) uint32_t c0[kLanes], c1[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t e = e0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(e);
    c1[l] = static_cast<uint32_t>(e >> 32);
  }
  alignas(64) float u0[kLanes], u1[kLanes], u2[kLanes], u3[kLanes];
  philox_uniforms(seed, c0, c1, u0, u1, u2, u3);
  const fVec two_pi(kTwoPi);
  for (int64_t l = 0; l < n; l += fVec::size()) {
    const int64_t m = std::min<int64_t>(fVec::size(), n - l);
    const fVec rho0 = radius(fVec::loadu(u0 + l));
    const fVec a = rayleigh ? (rho0 - fVec(kRayleighMean)) * fVec(kRayleighInvStd)
                            : rho0 * cos_of(two_pi * fVec::loadu(u1 + l));
    const fVec b = radius(fVec::loadu(u2 + l)) * cos_of(two_pi * fVec::loadu(u3 + l));
    a.store(n1 + l, m);
    b.store(n2 + l, m);
  }
}

template <typename In, typename Out>
void speckle_typed(const In* src, Out* out, Out* clean, int64_t numel, int64_t per_image,
                   const std::vector<float>& factor_sigma, const SpeckleParams& prm) {
  constexpr bool from_u8 = std::is_same_v<In, uint8_t>;
  const int64_t tasks = (numel + kTaskElements - 1) / kTaskElements;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // per-lane values of one block; lanes past the block's end are computed but never stored
    alignas(64) float n1[kLanes] = {}, n2[kLanes] = {}, v[kLanes] = {}, fs[kLanes] = {}, y[kLanes];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j_end = std::min(numel, (t + 1) * kTaskElements);
      int64_t image = (t * kTaskElements) / per_image, next_image = (image + 1) * per_image;
      for (int64_t j0 = t * kTaskElements; j0 < j_end; j0 += kLanes) {
        const int64_t n = std::min(kLanes, j_end - j0);
        noise_block(prm.seed, prm.offset + static_cast<uint64_t>(j0), n, prm.rayleigh, n1, n2);
        for (int64_t l = 0; l < n; ++l) {
          v[l] = from_u8 ? static_cast<float>(src[j0 + l]) / 255.0f : static_cast<float>(src[j0 + l]);
        }
        if (j0 + n <= next_image) {  // the usual case: the block lies in one image
          std::fill(fs, fs + kLanes, factor_sigma[image]);
        } else {
          for (int64_t l = 0; l < n; ++l) {
            if (j0 + l >= next_image) {
              ++image;
              next_image += per_image;
            }
            fs[l] = factor_sigma[image];
          }
        }
        for (int64_t l = 0; l < n; l += fVec::size()) {  // y = v*(1 + fs*n1) + sigma_add*n2
          fVec yv = fVec::loadu(v + l) * (fVec(1.0f) + fVec::loadu(fs + l) * fVec::loadu(n1 + l)) +
                    fVec(prm.sigma_add) * fVec::loadu(n2 + l);
          if (prm.clip) yv = at::vec::clamp(yv, fVec(0.0f), fVec(1.0f));
          yv.store(y + l);
        }
        if constexpr (from_u8) {
          for (int64_t l = 0; l < n; ++l) {
            out[j0 + l] = static_cast<Out>(2.0f * y[l] - 1.0f);
            clean[j0 + l] = static_cast<Out>(2.0f * v[l] - 1.0f);
          }
        } else {
          for (int64_t l = 0; l < n; ++l) out[j0 + l] = static_cast<Out>(y[l]);
        }
      }
    }
  });
}

}  // namespace

void speckle_noise(const at::Tensor& src, at::Tensor& out, at::Tensor* clean, int64_t images,
                   const SpeckleParams& prm) {
  const int64_t numel = src.numel();
  if (numel == 0) return;
  const int64_t per_image = numel / images;
  std::vector<float> factor_sigma(images);
  for (int64_t i = 0; i < images; ++i) {
    const float sigma = prm.sigma_span > 0.0f
                            ? prm.sigma_low + prm.sigma_span * image_uniform(prm.seed, prm.offset, i, per_image)
                            : prm.sigma_low;
    factor_sigma[i] = prm.factor * sigma;
  }
  SPECKLE_DISPATCH_FLOAT_TYPES(out.scalar_type(), "speckle_noise_cpu", [&] {
    if (clean != nullptr) {
      speckle_typed<uint8_t, scalar_t>(src.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(),
                                       clean->mutable_data_ptr<scalar_t>(), numel, per_image,
                                       factor_sigma, prm);
    } else {
      speckle_typed<scalar_t, scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                        nullptr, numel, per_image, factor_sigma, prm);
    }
  });
}

}  // namespace speckle::cpu
