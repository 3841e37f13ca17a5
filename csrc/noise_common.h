// Argument checks of the speckle-noise operators, shared by the CPU and CUDA bindings.
#pragma once

#include <ATen/ATen.h>

#include "api_common.h"
#include "include/philox.h"

namespace speckle {

inline SpeckleParams noise_params(int64_t seed, int64_t offset, double factor, double sigma_low,
                                  double sigma_high, double sigma_add, bool rayleigh, bool clip) {
  TORCH_CHECK(seed >= 0 && offset >= 0, "speckle noise: seed and offset must be >= 0, got ", seed,
              " and ", offset);
  TORCH_CHECK(factor >= 0.0 && sigma_add >= 0.0 && sigma_low >= 0.0 && sigma_high >= sigma_low,
              "speckle noise: need factor, sigma_add >= 0 and 0 <= sigma_low <= sigma_high, got factor=",
              factor, " sigma_add=", sigma_add, " sigma=(", sigma_low, ", ", sigma_high, ")");
  const float low = static_cast<float>(sigma_low);
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<float>(factor), low,
          static_cast<float>(sigma_high) - low, static_cast<float>(sigma_add), rayleigh, clip};
}

// Images along dim 0 when x has >= 2 dims; a 0-d or 1-d tensor is one image.
inline int64_t noise_images(const at::Tensor& x) {
  return x.dim() >= 2 ? std::max<int64_t>(x.size(0), 1) : 1;
}

inline void check_noisy_batch_args(const at::Tensor& clean_u8, at::ScalarType out_dtype) {
  TORCH_CHECK(clean_u8.scalar_type() == at::kByte, "make_noisy_batch: clean_u8 must be uint8, got ",
              clean_u8.scalar_type());
  TORCH_CHECK(clean_u8.dim() == 4, "make_noisy_batch: clean_u8 must be 4-d (N, C, H, W), got shape ",
              clean_u8.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "make_noisy_batch: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
}

}  // namespace speckle
