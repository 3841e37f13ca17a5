// CUDA registrations of the speckle_kernels operators (schemas: csrc/ops_schema.cpp), mirroring
// csrc/cpu/cpu_binding.cpp. Built only with a CUDA build of torch; checks the arguments, allocates
// outputs and workspaces on the current stream's device, and calls the launchers of
// launchers.h. No host synchronization: num_batches_tracked is read by the kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../api_common.h"
#include "../noise_common.h"
#include "launchers.h"

namespace speckle {
namespace {

cuda::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kByte: return cuda::DType::kUInt8;
    default: TORCH_CHECK(false, "speckle_kernels CUDA: unsupported dtype ", t);
  }
}

cuda::Layout cuda_layout(const ChannelLayout& lay) {
  TORCH_CHECK(lay.channels_last || lay.C <= 65535,
              "batch_renorm (CUDA): contiguous input supports at most 65535 channels, got ", lay.C);
  return {lay.channels_last, lay.N, lay.C, lay.L};
}

int partials_for(const cuda::Layout& lay) {
  int device = 0, multiprocessors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  return cuda::batch_renorm_partials(lay, multiprocessors);
}

const float* optional_ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  check_forward_args(x, weight, bias, running_mean, running_std, num_batches_tracked, momentum, eps);
  TORCH_CHECK(x.is_cuda(), "batch_renorm_forward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const ChannelLayout lay = channel_layout(x);
  const cuda::Layout cl = cuda_layout(lay);
  // fp32 contiguous buffers are used in place; any other dtype is converted and copied back
  at::Tensor rm = channel_floats(running_mean), rs = channel_floats(running_std);
  const at::Tensor w = weight ? channel_floats(*weight) : at::Tensor();
  const at::Tensor b = bias ? channel_floats(*bias) : at::Tensor();
  at::Tensor nbt = num_batches_tracked.contiguous();
  at::Tensor stats = at::empty({kStatRows, lay.C}, x.options().dtype(at::kFloat));
  const int P = partials_for(cl);
  at::Tensor partial =
      at::empty({training ? cuda::kPartialRows : 0, P, lay.C}, stats.options().dtype(at::kDouble));
  at::Tensor y = at::empty_like(lay.x);
  cuda::batch_renorm_forward(dtype_of(x.scalar_type()), lay.x.const_data_ptr(), y.mutable_data_ptr(), cl,
                             optional_ptr(w), optional_ptr(b), rm.mutable_data_ptr<float>(),
                             rs.mutable_data_ptr<float>(), nbt.mutable_data_ptr<int64_t>(),
                             stats.mutable_data_ptr<float>(), partial.mutable_data_ptr<double>(), P, training,
                             static_cast<float>(momentum), static_cast<float>(eps), schedule_from(r_max, "r_max"),
                             schedule_from(d_max, "d_max"), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (training) {
    if (!rm.is_same(running_mean)) running_mean.copy_(rm);
    if (!rs.is_same(running_std)) running_std.copy_(rs);
    if (!nbt.is_same(num_batches_tracked)) num_batches_tracked.copy_(nbt);
  }
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  check_backward_args(dy_in, x, weight, stats);
  TORCH_CHECK(x.is_cuda(), "batch_renorm_backward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const ChannelLayout lay = channel_layout(x);
  const cuda::Layout cl = cuda_layout(lay);
  const at::Tensor dy = match_layout(dy_in.to(x.scalar_type()), lay.x);
  const at::Tensor w = weight ? channel_floats(*weight) : at::Tensor();
  at::Tensor grads = at::empty({kGradRows, lay.C}, stats.options());
  const int P = partials_for(cl);
  at::Tensor partial = at::empty({2, P, lay.C}, stats.options().dtype(at::kDouble));  // S(dy), S(dy*z)
  at::Tensor dx = at::empty_like(lay.x);
  cuda::batch_renorm_backward(dtype_of(x.scalar_type()), lay.x.const_data_ptr(), dy.const_data_ptr(),
                              dx.mutable_data_ptr(), cl, optional_ptr(w), stats.const_data_ptr<float>(),
                              grads.mutable_data_ptr<float>(), partial.mutable_data_ptr<double>(), P, training,
                              c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, grads[kGradWeight].clone(), grads[kGradBias].clone()};  // outputs must not alias
}

at::Tensor add_speckle_noise_cuda(const at::Tensor& x, int64_t seed, int64_t offset, double factor,
                                  double sigma_low, double sigma_high, double sigma_add, bool rayleigh, bool clip) {
  check_float_input(x, "add_speckle_noise: x");
  const SpeckleParams prm = noise_params(seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = x.contiguous();
  at::Tensor y = at::empty_like(src);
  if (src.numel() == 0) return y;
  const int64_t images = noise_images(src);
  cuda::speckle_noise(dtype_of(src.scalar_type()), dtype_of(src.scalar_type()), src.const_data_ptr(),
                      y.mutable_data_ptr(), nullptr, src.numel(), src.numel() / images, prm,
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::tuple<at::Tensor, at::Tensor> make_noisy_batch_cuda(const at::Tensor& clean_u8, int64_t seed, int64_t offset,
                                                         double factor, double sigma_low, double sigma_high,
                                                         double sigma_add, bool rayleigh, bool clip,
                                                         at::ScalarType out_dtype) {
  check_noisy_batch_args(clean_u8, out_dtype);
  const SpeckleParams prm = noise_params(seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip);
  const c10::cuda::CUDAGuard guard(clean_u8.device());
  const at::Tensor src = clean_u8.contiguous();
  at::Tensor noisy = at::empty(src.sizes(), src.options().dtype(out_dtype));
  at::Tensor clean = at::empty_like(noisy);
  if (src.numel() == 0) return {noisy, clean};
  cuda::speckle_noise(cuda::DType::kUInt8, dtype_of(out_dtype), src.const_data_ptr(), noisy.mutable_data_ptr(),
                      clean.mutable_data_ptr(), src.numel(), src.numel() / noise_images(src), prm,
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {noisy, clean};
}

}  // namespace
}  // namespace speckle

TORCH_LIBRARY_IMPL(speckle_kernels, CUDA, m) {
  m.impl("batch_renorm_forward", &speckle::forward_cuda);
  m.impl("batch_renorm_backward", &speckle::backward_cuda);
  m.impl("add_speckle_noise", &speckle::add_speckle_noise_cuda);
  m.impl("make_noisy_batch", &speckle::make_noisy_batch_cuda);
}
