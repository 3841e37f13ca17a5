// CPU registrations of the speckle_kernels operators (schemas: csrc/ops_schema.cpp), mirroring
// csrc/cuda/cuda_binding.cpp: checks the arguments and calls the kernels of cpu_kernels.h.
// The utility ops without tensor arguments (lane widths, output cache) are registered as
// CompositeImplicitAutograd, the key a schema's own function (m.def(schema, fn)) gets, so they
// answer without a tensor to dispatch on.
#include <torch/library.h>

#include "../api_common.h"
#include "../noise_common.h"
#include "cpu_kernels.h"

namespace speckle {
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  check_forward_args(x, weight, bias, running_mean, running_std, num_batches_tracked, momentum, eps);
  TORCH_CHECK(x.device().is_cpu(), "batch_renorm_forward (CPU kernel): x must be a CPU tensor");
  return cpu::batch_renorm_forward(channel_layout(x), weight, bias, running_mean, running_std,
                                   num_batches_tracked, training, static_cast<float>(momentum),
                                   static_cast<float>(eps), schedule_from(r_max, "r_max"),
                                   schedule_from(d_max, "d_max"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  check_backward_args(dy, x, weight, stats);
  return cpu::batch_renorm_backward(dy, channel_layout(x), weight, stats, training);
}

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

TORCH_LIBRARY_IMPL(speckle_kernels, CPU, m) {
  m.impl("batch_renorm_forward", &speckle::forward_cpu);
  m.impl("batch_renorm_backward", &speckle::backward_cpu);
  m.impl("add_speckle_noise", &speckle::add_speckle_noise_cpu);
  m.impl("make_noisy_batch", &speckle::make_noisy_batch_cpu);
}

TORCH_LIBRARY_IMPL(speckle_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_noise_lane_widths", &speckle::cpu::noise_lane_widths);
  m.impl("cpu_output_cache_idle_bytes", &speckle::cpu::cpu_output_cache_idle_bytes);
  m.impl("empty_cpu_output_cache", &speckle::cpu::empty_cpu_output_cache);
}
