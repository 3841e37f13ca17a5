// Speckle-noise operators of the speckle_kernels library: schemas, checks, CPU registration.
//
//   add_speckle_noise(x, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip)
//       x: float32 / float16 / bfloat16, any shape (dim 0 indexes images when x.dim() >= 2)
//   make_noisy_batch(clean_u8, ..., out_dtype) -> (noisy, clean)
//       clean_u8: uint8 (N, C, H, W); out_dtype float32 / bfloat16 / float16
// The stream is the one of speckle_kernels/noise.py (see csrc/include/philox.h); sigma is drawn
// per image when sigma_high > sigma_low. Outputs are contiguous.
#include <torch/library.h>

#include "noise_common.h"
#include "cpu/cpu_kernels.h"

namespace speckle {
namespace {

at::Tensor add_speckle_noise_cpu(const at::Tensor& x, int64_t seed, int64_t offset, double factor,
                                 double sigma_low, double sigma_high, double sigma_add,
                                 bool rayleigh, bool clip) {
  check_float_input(x, "add_speckle_noise: x");
  const SpeckleParams prm = noise_params(seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip);
  const at::Tensor src = x.contiguous();
  at::Tensor y = cpu::empty_output(src);
  cpu::speckle_noise(src, y, nullptr, noise_images(src), prm);
  return y;
}

std::tuple<at::Tensor, at::Tensor> make_noisy_batch_cpu(const at::Tensor& clean_u8, int64_t seed,
                                                        int64_t offset, double factor, double sigma_low,
                                                        double sigma_high, double sigma_add, bool rayleigh,
                                                        bool clip, at::ScalarType out_dtype) {
  check_noisy_batch_args(clean_u8, out_dtype);
  const SpeckleParams prm = noise_params(seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip);
  const at::Tensor src = clean_u8.contiguous();
  at::Tensor noisy = cpu::empty_output(src, out_dtype);
  at::Tensor clean = cpu::empty_output(noisy);
  cpu::speckle_noise(src, noisy, &clean, noise_images(src), prm);
  return {noisy, clean};
}

}  // namespace
}  // namespace speckle

TORCH_LIBRARY_FRAGMENT(speckle_kernels, m) {
  m.def(
      "add_speckle_noise(Tensor x, int seed, int offset, float factor, float sigma_low, "
      "float sigma_high, float sigma_add, bool rayleigh, bool clip) -> Tensor");
  m.def(
      "make_noisy_batch(Tensor clean_u8, int seed, int offset, float factor, float sigma_low, "
      "float sigma_high, float sigma_add, bool rayleigh, bool clip, ScalarType out_dtype) "
      "-> (Tensor, Tensor)");
  m.def("cpu_noise_lane_widths() -> int[]", &speckle::cpu::noise_lane_widths);
}

TORCH_LIBRARY_IMPL(speckle_kernels, CPU, m) {
  m.impl("add_speckle_noise", &speckle::add_speckle_noise_cpu);
  m.impl("make_noisy_batch", &speckle::make_noisy_batch_cpu);
}
