// Speckle noise on the CPU: the Philox stream of csrc/include/philox.h, 64 lanes at a time.
//
// Per block of 64 consecutive elements: Philox4x32-10 and Box-Muller give n1, n2 on SIMD
// lanes (noise_lanes.h: 16 lanes in the AVX-512 variant, 8 in it and the AVX2 one; all give the
// same bits), then y is formed and rounded to the output dtype. A portable path (scalar Philox
// rounds, log and cos through at::vec) serves the DEFAULT variant and is built in every one.
// SPECKLE_CPU_NOISE_LANES=16|8|1 picks one of the variant's paths (1: the portable one; the tests
// run each); the dropout mask of batch_renorm_act_cpu.cpp follows the same choice. Every value
// depends only on (seed, offset, flat index), so the split into parallel tasks changes nothing.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "noise_lanes.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)
namespace {

constexpr int64_t kLanes = 64;
constexpr int64_t kNoiseTaskElements = 8192;

// n1, n2 of kLanes elements from their counter words (c0[l], c1[l], 0, 0).
using StandardNoiseFn = void (*)(uint64_t seed, const uint32_t* c0, const uint32_t* c1,
                                 bool rayleigh, float* n1, float* n2);

void standard_noise_portable(uint64_t seed, const uint32_t* c0, const uint32_t* c1, bool rayleigh,
                             float* n1, float* n2) {
  alignas(64) float u[4][kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    uint32_t r0 = c0[l], r1 = c1[l], r2 = 0, r3 = 0;
    philox4x32_10(seed, r0, r1, r2, r3);
    u[0][l] = philox_uniform(r0);
    u[1][l] = philox_uniform(r1);
    u[2][l] = philox_uniform(r2);
    u[3][l] = philox_uniform(r3);
  }
  const fVec tiny(kTinyUniform), minus_two(-2.0f), two_pi(kTwoPi);
  auto radius = [&](const float* p) { return (at::vec::maximum(fVec::loadu(p), tiny).log() * minus_two).sqrt(); };
  for (int64_t l = 0; l < kLanes; l += fVec::size()) {
    const fVec rho0 = radius(u[0] + l);
    const fVec a = rayleigh ? (rho0 - fVec(kRayleighMean)) * fVec(kRayleighInvStd)
                            : rho0 * (two_pi * fVec::loadu(u[1] + l)).cos();
    const fVec b = radius(u[2] + l) * (two_pi * fVec::loadu(u[3] + l)).cos();
    a.store(n1 + l);
    b.store(n2 + l);
  }
}

// The built paths, widest first.
const std::vector<std::pair<int64_t, StandardNoiseFn>>& built_paths() {
  static const std::vector<std::pair<int64_t, StandardNoiseFn>> paths{
#if defined(SPECKLE_NOISE_LANES16)
      {16, &lanes::standard_noise_lanes<16, kLanes>},
#endif
#if defined(SPECKLE_NOISE_LANES8)
      {8, &lanes::standard_noise_lanes<8, kLanes>},
#endif
      {1, &standard_noise_portable}};
  return paths;
}

StandardNoiseFn standard_noise_path() {
  const int64_t width = philox_lane_width();
  for (const auto& [w, fn] : built_paths()) {
    if (w == width) return fn;
  }
  return built_paths().back().second;
}

// n1, n2 for elements e0 .. e0 + kLanes - 1 (the caller stores only those it needs).
void noise_block(StandardNoiseFn standard_noise, uint64_t seed, uint64_t e0, bool rayleigh,
                 float* n1, float* n2) {
  alignas(64) uint32_t c0[kLanes], c1[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t e = e0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(e);
    c1[l] = static_cast<uint32_t>(e >> 32);
  }
  standard_noise(seed, c0, c1, rayleigh, n1, n2);
}

template <typename In, typename Out>
void speckle_typed(const In* src, Out* out, Out* clean, int64_t numel, int64_t per_image,
                   const std::vector<float>& factor_sigma, const SpeckleParams& prm,
                   StandardNoiseFn standard_noise) {
  constexpr bool from_u8 = std::is_same_v<In, uint8_t>;
  const int64_t tasks = (numel + kNoiseTaskElements - 1) / kNoiseTaskElements;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // per-lane values of one block; lanes past the block's end are computed but never stored
    alignas(64) float n1[kLanes] = {}, n2[kLanes] = {}, v[kLanes] = {}, fs[kLanes] = {}, y[kLanes];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j_end = std::min(numel, (t + 1) * kNoiseTaskElements);
      int64_t image = (t * kNoiseTaskElements) / per_image, next_image = (image + 1) * per_image;
      for (int64_t j0 = t * kNoiseTaskElements; j0 < j_end; j0 += kLanes) {
        const int64_t n = std::min(kLanes, j_end - j0);
        noise_block(standard_noise, prm.seed, prm.offset + static_cast<uint64_t>(j0), prm.rayleigh, n1, n2);
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
  const StandardNoiseFn standard_noise = standard_noise_path();
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
                                       factor_sigma, prm, standard_noise);
    } else {
      speckle_typed<scalar_t, scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                        nullptr, numel, per_image, factor_sigma, prm, standard_noise);
    }
  });
}

// The widest built path, or the one SPECKLE_CPU_NOISE_LANES names.
int64_t philox_lane_width() {
  const auto& paths = built_paths();
  const char* env = std::getenv("SPECKLE_CPU_NOISE_LANES");
  if (env == nullptr || *env == '\0') return paths.front().first;
  std::string built;
  for (const auto& path : paths) {
    if (std::to_string(path.first) == env) return path.first;
    built += (built.empty() ? "" : ", ") + std::to_string(path.first);
  }
  TORCH_CHECK_VALUE(false, "SPECKLE_CPU_NOISE_LANES must name a built path (", built, ") of the ",
                    SPECKLE_ISA_NAME, " kernels, got '", env, "'");
}

std::vector<int64_t> noise_lane_widths() {
  std::vector<int64_t> widths;
  for (const auto& path : built_paths()) widths.push_back(path.first);
  return widths;
}

}  // namespace speckle::cpu::CPU_CAPABILITY
