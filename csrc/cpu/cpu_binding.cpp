// CPU registrations of the speckle_kernels operators (schemas: csrc/ops_schema.cpp), mirroring
// csrc/cuda/cuda_binding.cpp: checks the arguments and calls the kernels of the variant that
// cpu_dispatch.cpp chose (cpu_kernels.h).
// The utility ops without tensor arguments (lane widths, variants, output cache) are registered as
// CompositeImplicitAutograd, the key a schema's own function (m.def(schema, fn)) gets, so they
// answer without a tensor to dispatch on.
#include <torch/library.h>

#include "../api_common.h"
#include "../noise_common.h"
#include "cpu_kernels.h"

namespace speckle {
namespace {

// The forward ops' shared arguments, checked and converted.
struct ForwardArgs {
  ChannelLayout lay;
  float momentum, eps;
  Schedule r_sched, d_sched;
};

ForwardArgs forward_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                         const at::Tensor& running_std, const at::Tensor& num_batches_tracked,
                         double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  check_forward_args(x, weight, bias, running_mean, running_std, num_batches_tracked, momentum, eps);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): x must be a CPU tensor");
  return {channel_layout(x), static_cast<float>(momentum), static_cast<float>(eps),
          schedule_from(r_max, "r_max"), schedule_from(d_max, "d_max")};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  const ForwardArgs a = forward_args("batch_renorm_forward", x, weight, bias, running_mean, running_std,
                                     num_batches_tracked, momentum, eps, r_max, d_max);
  return cpu::kernels().batch_renorm_forward(a.lay, weight, bias, running_mean, running_std, num_batches_tracked,
                                   training, a.momentum, a.eps, a.r_sched, a.d_sched);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  check_backward_args(dy, x, weight, stats);
  return cpu::kernels().batch_renorm_backward(dy, channel_layout(x), weight, stats, training);
}

at::Tensor stats_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, at::Tensor running_mean, at::Tensor running_std,
                     at::Tensor num_batches_tracked, bool training, double momentum, double eps,
                     at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  const ForwardArgs a = forward_args("batch_renorm_stats", x, weight, bias, running_mean, running_std,
                                     num_batches_tracked, momentum, eps, r_max, d_max);
  return cpu::kernels().batch_renorm_stats(a.lay, weight, bias, running_mean, running_std, num_batches_tracked,
                                 training, a.momentum, a.eps, a.r_sched, a.d_sched);
}

// The norm block's own arguments, checked before anything is read or written: Python gets a
// ValueError / TypeError that names the bad value.
cpu::BlockParams block_params(const char* op, bool training, int64_t activation, double negative_slope,
                              double dropout, const at::Tensor& rng) {
  TORCH_CHECK_VALUE(activation == kIdentity || activation == kRelu || activation == kLeakyRelu, op,
                    ": activation must be 0 (identity), 1 (relu) or 2 (leaky_relu), got ", activation);
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, op, ": dropout must lie in [0, 1), got ", dropout);
  TORCH_CHECK_TYPE(rng.scalar_type() == at::kLong, op, ": rng must be an int64 tensor (seed, offset), got ",
                   rng.scalar_type());
  TORCH_CHECK_VALUE(rng.dim() == 1 && rng.size(0) == 2, op,
                    ": rng must have shape (2,) (seed, offset), got ", rng.sizes());
  TORCH_CHECK_VALUE(rng.device().is_cpu(), op, ": rng must be a CPU tensor here, got ", rng.device());
  const auto r = rng.accessor<int64_t, 1>();
  const int64_t seed = r[0], offset = r[1];
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": rng (seed, offset) must be >= 0, got (", seed, ", ",
                    offset, ")");
  const bool active = training && dropout > 0.0;
  return {static_cast<int>(activation), negative_side_slope(static_cast<int>(activation),
                                                            static_cast<float>(negative_slope)),
          {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<float>(dropout),
           static_cast<float>(1.0 / (1.0 - dropout)), active}};
}

std::tuple<at::Tensor, at::Tensor> act_forward_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max,
    int64_t activation, double negative_slope, double dropout, const at::Tensor& rng) {
  const cpu::BlockParams block =
      block_params("batch_renorm_act_forward", training, activation, negative_slope, dropout, rng);
  const ForwardArgs a = forward_args("batch_renorm_act_forward", x, weight, bias, running_mean, running_std,
                                     num_batches_tracked, momentum, eps, r_max, d_max);
  return cpu::kernels().batch_renorm_act_forward(a.lay, weight, bias, running_mean, running_std, num_batches_tracked,
                                       training, a.momentum, a.eps, a.r_sched, a.d_sched, block);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training, int64_t activation, double negative_slope, double dropout,
    const at::Tensor& rng) {
  const cpu::BlockParams block =
      block_params("batch_renorm_act_backward", training, activation, negative_slope, dropout, rng);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "batch_renorm_act_backward: dy has shape ", dy.sizes(),
                    " but x has ", x.sizes());
  check_backward_args(dy, x, weight, stats);
  return cpu::kernels().batch_renorm_act_backward(dy, channel_layout(x), weight, stats, training, block);
}

at::Tensor add_speckle_noise_cpu(const at::Tensor& x, int64_t seed, int64_t offset, double factor,
                                 double sigma_low, double sigma_high, double sigma_add,
                                 bool rayleigh, bool clip) {
  check_float_input(x, "add_speckle_noise: x");
  const SpeckleParams prm = noise_params(seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip);
  const at::Tensor src = x.contiguous();
  at::Tensor y = cpu::empty_output(src);
  cpu::kernels().speckle_noise(src, y, nullptr, noise_images(src), prm);
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
  cpu::kernels().speckle_noise(src, noisy, &clean, noise_images(src), prm);
  return {noisy, clean};
}

}  // namespace
}  // namespace speckle

TORCH_LIBRARY_IMPL(speckle_kernels, CPU, m) {
  m.impl("batch_renorm_forward", &speckle::forward_cpu);
  m.impl("batch_renorm_backward", &speckle::backward_cpu);
  m.impl("batch_renorm_stats", &speckle::stats_cpu);
  m.impl("batch_renorm_act_forward", &speckle::act_forward_cpu);
  m.impl("batch_renorm_act_backward", &speckle::act_backward_cpu);
  m.impl("add_speckle_noise", &speckle::add_speckle_noise_cpu);
  m.impl("make_noisy_batch", &speckle::make_noisy_batch_cpu);
}

TORCH_LIBRARY_IMPL(speckle_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_noise_lane_widths", [] { return speckle::cpu::kernels().noise_lane_widths(); });
  m.impl("cpu_capability", &speckle::cpu::cpu_capability);
  m.impl("cpu_capabilities", &speckle::cpu::cpu_capabilities);
  m.impl("cpu_capability_note", &speckle::cpu::cpu_capability_note);
  m.impl("cpu_output_cache_idle_bytes", &speckle::cpu::cpu_output_cache_idle_bytes);
  m.impl("empty_cpu_output_cache", &speckle::cpu::empty_cpu_output_cache);
}
