// Philox4x32-10 and the speckle-noise transforms, shared by the CPU and CUDA kernels.
//
// The stream is the one speckle_kernels/noise.py documents (and its Triton kernel draws):
//   key (seed & 0xFFFFFFFF, seed >> 32); element e = offset + flat index, counter
//   (e lo, e hi, 0, 0) -> words r0..r3; per-image sigma (pair sigma_mult only): counter
//   (e_i lo, e_i hi, 0, 1) with e_i = offset + image * numel_per_image, word r0.
//   u(r) = float(r < 2^31 ? r : 2^32 - 1 - r) * 4.6566127342e-10f
//   n1 = rho(u(r0)) * cos(2 pi u(r1))  (gaussian)  or (rho(u(r0)) - sqrt(pi/2)) / sqrt(2 - pi/2)
//   n2 = rho(u(r2)) * cos(2 pi u(r3)),  rho(u) = sqrt(-2 ln max(u, 1e-7))
//   y = v * (1 + factor*sigma*n1) + sigma_add*n2, clipped to [0, 1] when clip.
// All float arithmetic after the integer words is float32, as in the Triton kernel.
#pragma once

#include <math.h>
#include <stdint.h>

#include "hd.h"

namespace speckle {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;  // Weyl increments of the two key words
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kTinyUniform = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kRayleighMean = 1.2533141373155001f;    // sqrt(pi/2)
constexpr float kRayleighInvStd = 1.5263997455328482f;  // 1/sqrt(2 - pi/2)

// One Philox round on the counter words; the caller bumps the key between rounds.
SPECKLE_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                             uint32_t k1) {
  const uint64_t pa = static_cast<uint64_t>(kPhiloxMulA) * c0;
  const uint64_t pb = static_cast<uint64_t>(kPhiloxMulB) * c2;
  const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(pb);
  c3 = static_cast<uint32_t>(pa);
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under `seed`; the words are replaced in place.
SPECKLE_HD void philox4x32_10(uint64_t seed, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                              uint32_t& c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < kPhiloxRounds; ++i) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// uint32 word -> float in [0, 1) (Triton's uint_to_uniform_float).
SPECKLE_HD float philox_uniform(uint32_t r) {
  const int32_t v = static_cast<int32_t>(r);
  return static_cast<float>(v < 0 ? ~v : v) * kUniformScale;
}

// The uniform that picks image `image`'s sigma (sigma = low + (high - low) * u).
SPECKLE_HD float image_uniform(uint64_t seed, uint64_t offset, uint64_t image,
                               uint64_t numel_per_image) {
  const uint64_t e = offset + image * numel_per_image;
  uint32_t c0 = static_cast<uint32_t>(e), c1 = static_cast<uint32_t>(e >> 32), c2 = 0, c3 = 1;
  philox4x32_10(seed, c0, c1, c2, c3);
  return philox_uniform(c0);
}

// rho(u) = sqrt(-2 ln max(u, 1e-7)), the Box-Muller / Rayleigh radius.
SPECKLE_HD float noise_radius(float u) { return sqrtf(-2.0f * logf(fmaxf(u, kTinyUniform))); }

// The two standard variables (n1, n2) of flat element e, scalar form.
SPECKLE_HD void standard_noise(uint64_t seed, uint64_t e, bool rayleigh, float& n1, float& n2) {
  uint32_t r0 = static_cast<uint32_t>(e), r1 = static_cast<uint32_t>(e >> 32), r2 = 0, r3 = 0;
  philox4x32_10(seed, r0, r1, r2, r3);
  const float rho0 = noise_radius(philox_uniform(r0));
  n1 = rayleigh ? (rho0 - kRayleighMean) * kRayleighInvStd
                : rho0 * cosf(kTwoPi * philox_uniform(r1));
  n2 = noise_radius(philox_uniform(r2)) * cosf(kTwoPi * philox_uniform(r3));
}

// Comparisons rather than fminf/fmaxf: the host compiler calls libm for those.
SPECKLE_HD float clamp_unit(float y) { return y < 0.0f ? 0.0f : (y > 1.0f ? 1.0f : y); }

// Noise parameters of one call (sigma is per image when sigma_span > 0).
struct SpeckleParams {
  uint64_t seed, offset;
  float factor, sigma_low, sigma_span, sigma_add;
  bool rayleigh, clip;
};

// y from v, the image's factor*sigma and the element's standard normals / radius.
SPECKLE_HD float speckle_apply(float v, float factor_sigma, float n1, float n2, float sigma_add,
                               bool clip) {
  const float y = v * (1.0f + factor_sigma * n1) + sigma_add * n2;
  return clip ? clamp_unit(y) : y;
}

}  // namespace speckle
