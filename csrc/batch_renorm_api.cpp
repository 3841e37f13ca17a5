// The speckle_kernels operator library: schemas, argument checks, CPU registrations.
//
//   batch_renorm_forward(x, weight?, bias?, running_mean!, running_std!, num_batches_tracked!,
//                        training, momentum, eps, r_max[4], d_max[4]) -> (y, stats)
//   batch_renorm_backward(dy, x, weight?, stats, training) -> (dx, dweight, dbias)
//   add_speckle_noise(x, ...) -> y;  make_noisy_batch(clean_u8, ..., out_dtype) -> (noisy, clean)
// Supported types and layouts: see api_common.h. stats is the (8, C) fp32 tensor of
// csrc/include/batch_renorm_math.h (rows kPivot..kShift). r_max/d_max are RenormSchedule's
// (slope, start, low, high). The CUDA bindings (csrc/cuda/*_binding.cpp) register the same
// schemas for CUDA tensors. Autograd lives in speckle_kernels/_ext.py.
#include <torch/library.h>

#include "api_common.h"
#include "cpu/cpu_kernels.h"

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

}  // namespace
}  // namespace speckle

TORCH_LIBRARY(speckle_kernels, m) {
  m.def(
      "batch_renorm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_std, Tensor(c!) num_batches_tracked, bool training, float momentum, "
      "float eps, float[] r_max, float[] d_max) -> (Tensor, Tensor)");
  m.def(
      "batch_renorm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor stats, bool training) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(speckle_kernels, CPU, m) {
  m.impl("batch_renorm_forward", &speckle::forward_cpu);
  m.impl("batch_renorm_backward", &speckle::backward_cpu);
}
