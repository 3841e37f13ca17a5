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

// The buffers of a statistics pass: fp32 contiguous running statistics and affine parameters
// (the tensors themselves when they already are; else copies, written back after the launch),
// the stats rows and the partials workspace.
struct StatsBuffers {
  at::Tensor rm, rs, w, b, nbt, stats, partial;
  int P;
};

// Checks, device guard and buffers of an op that runs the statistics pass; launch(lay, cl, buffers)
// enqueues the kernels. Returns what launch returns.
template <typename Launch>
auto run_with_statistics(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
                         at::Tensor& num_batches_tracked, bool training, double momentum, double eps,
                         Launch&& launch) {
  check_forward_args(x, weight, bias, running_mean, running_std, num_batches_tracked, momentum, eps);
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const ChannelLayout lay = channel_layout(x);
  const cuda::Layout cl = cuda_layout(lay);
  StatsBuffers sb{channel_floats(running_mean), channel_floats(running_std),
                  weight ? channel_floats(*weight) : at::Tensor(), bias ? channel_floats(*bias) : at::Tensor(),
                  num_batches_tracked.contiguous(), at::empty({kStatRows, lay.C}, x.options().dtype(at::kFloat)),
                  at::Tensor(), partials_for(cl)};
  sb.partial = at::empty({training ? cuda::kPartialRows : 0, sb.P, lay.C}, x.options().dtype(at::kDouble));
  auto result = launch(lay, cl, sb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (training) {
    if (!sb.rm.is_same(running_mean)) running_mean.copy_(sb.rm);
    if (!sb.rs.is_same(running_std)) running_std.copy_(sb.rs);
    if (!sb.nbt.is_same(num_batches_tracked)) num_batches_tracked.copy_(sb.nbt);
  }
  return result;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  return run_with_statistics(
      "batch_renorm_forward", x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum,
      eps, [&](const ChannelLayout& lay, const cuda::Layout& cl, StatsBuffers& sb) {
        at::Tensor y = at::empty_like(lay.x);
        cuda::batch_renorm_forward(dtype_of(x.scalar_type()), lay.x.const_data_ptr(), y.mutable_data_ptr(), cl,
                                   optional_ptr(sb.w), optional_ptr(sb.b), sb.rm.mutable_data_ptr<float>(),
                                   sb.rs.mutable_data_ptr<float>(), sb.nbt.mutable_data_ptr<int64_t>(),
                                   sb.stats.mutable_data_ptr<float>(), sb.partial.mutable_data_ptr<double>(), sb.P,
                                   training, static_cast<float>(momentum), static_cast<float>(eps),
                                   schedule_from(r_max, "r_max"), schedule_from(d_max, "d_max"),
                                   c10::cuda::getCurrentCUDAStream());
        return std::make_tuple(y, sb.stats);
      });
}

// The statistics pass alone: batch_renorm_forward's stats and buffer update, no y.
at::Tensor stats_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, at::Tensor running_mean, at::Tensor running_std,
                      at::Tensor num_batches_tracked, bool training, double momentum, double eps,
                      at::ArrayRef<double> r_max, at::ArrayRef<double> d_max) {
  return run_with_statistics(
      "batch_renorm_stats", x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
      [&](const ChannelLayout& lay, const cuda::Layout& cl, StatsBuffers& sb) {
        cuda::batch_renorm_stats(dtype_of(x.scalar_type()), lay.x.const_data_ptr(), cl, optional_ptr(sb.w),
                                 optional_ptr(sb.b), sb.rm.mutable_data_ptr<float>(), sb.rs.mutable_data_ptr<float>(),
                                 sb.nbt.mutable_data_ptr<int64_t>(), sb.stats.mutable_data_ptr<float>(),
                                 sb.partial.mutable_data_ptr<double>(), sb.P, training, static_cast<float>(momentum),
                                 static_cast<float>(eps), schedule_from(r_max, "r_max"),
                                 schedule_from(d_max, "d_max"), c10::cuda::getCurrentCUDAStream());
        return sb.stats;
      });
}

// The block's own arguments; returns the dropout parameters (seed and offset stay on the device).
DropoutParams block_params(const char* op, const at::Tensor& x, bool training, int64_t activation,
                           double negative_slope, double dropout, const at::Tensor& rng, float& slope) {
  TORCH_CHECK_VALUE(activation >= kIdentity && activation <= kLeakyRelu, op,
                    ": activation must be 0 (identity), 1 (relu) or 2 (leaky_relu), got ", activation);
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, op, ": dropout must lie in [0, 1), got ", dropout);
  TORCH_CHECK_TYPE(rng.scalar_type() == at::kLong, op, ": rng must be an int64 tensor (seed, offset), got ",
                   rng.scalar_type());
  TORCH_CHECK_VALUE(rng.dim() == 1 && rng.numel() == 2, op, ": rng must have shape (2,) (seed, offset), got ",
                    rng.sizes());
  TORCH_CHECK_VALUE(rng.device() == x.device(), op, ": rng is on ", rng.device(), " but x is on ", x.device());
  slope = negative_side_slope(static_cast<int>(activation), static_cast<float>(negative_slope));
  const bool active = training && dropout > 0.0;
  const float p = static_cast<float>(dropout);
  return {0, 0, p, active ? static_cast<float>(1.0 / (1.0 - dropout)) : 1.0f, active};
}

std::tuple<at::Tensor, at::Tensor> act_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    at::Tensor running_mean, at::Tensor running_std, at::Tensor num_batches_tracked, bool training,
    double momentum, double eps, at::ArrayRef<double> r_max, at::ArrayRef<double> d_max, int64_t activation,
    double negative_slope, double dropout, const at::Tensor& rng_in) {
  float slope = 0.0f;
  const DropoutParams drop =
      block_params("batch_renorm_act_forward", x, training, activation, negative_slope, dropout, rng_in, slope);
  const at::Tensor rng = rng_in.contiguous();
  const at::Tensor stats = stats_cuda(x, weight, bias, running_mean, running_std, num_batches_tracked, training,
                                      momentum, eps, r_max, d_max);
  const c10::cuda::CUDAGuard guard(x.device());
  const ChannelLayout lay = channel_layout(x);
  at::Tensor y = at::empty_like(lay.x);
  cuda::batch_renorm_act_forward(dtype_of(x.scalar_type()), lay.x.const_data_ptr(), y.mutable_data_ptr(),
                                 cuda_layout(lay), stats.const_data_ptr<float>(), rng.const_data_ptr<int64_t>(),
                                 slope, drop, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, stats};
}

// x as the kernels read it, dy in its layout and the outputs and workspace of a backward op.
struct BackwardBuffers {
  ChannelLayout lay;
  cuda::Layout cl;
  at::Tensor dy, w, grads, partial, dx;  // partial: (2, P, C) fp64, S(dy) and S(dy*u)
  int P;
};

// Checks and device guard of a backward op; launch(buffers) enqueues the kernels.
// Returns (dx, dweight, dbias).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const char* op, const at::Tensor& dy_in,
                                                            const at::Tensor& x,
                                                            const std::optional<at::Tensor>& weight,
                                                            const at::Tensor& stats, Launch&& launch) {
  check_backward_args(dy_in, x, weight, stats);
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardBuffers bb{channel_layout(x)};
  bb.cl = cuda_layout(bb.lay);
  bb.dy = match_layout(dy_in.to(x.scalar_type()), bb.lay.x);
  bb.w = weight ? channel_floats(*weight) : at::Tensor();
  bb.grads = at::empty({kGradRows, bb.lay.C}, stats.options());
  bb.P = partials_for(bb.cl);
  bb.partial = at::empty({2, bb.P, bb.lay.C}, stats.options().dtype(at::kDouble));
  bb.dx = at::empty_like(bb.lay.x);
  launch(bb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {bb.dx, bb.grads[kGradWeight].clone(), bb.grads[kGradBias].clone()};  // outputs must not alias
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  return run_backward("batch_renorm_backward", dy_in, x, weight, stats, [&](BackwardBuffers& bb) {
    cuda::batch_renorm_backward(dtype_of(x.scalar_type()), bb.lay.x.const_data_ptr(), bb.dy.const_data_ptr(),
                                bb.dx.mutable_data_ptr(), bb.cl, optional_ptr(bb.w), stats.const_data_ptr<float>(),
                                bb.grads.mutable_data_ptr<float>(), bb.partial.mutable_data_ptr<double>(), bb.P,
                                training, c10::cuda::getCurrentCUDAStream());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight, const at::Tensor& stats,
    bool training, int64_t activation, double negative_slope, double dropout, const at::Tensor& rng_in) {
  float slope = 0.0f;
  const DropoutParams drop =
      block_params("batch_renorm_act_backward", x, training, activation, negative_slope, dropout, rng_in, slope);
  const at::Tensor rng = rng_in.contiguous();
  return run_backward("batch_renorm_act_backward", dy_in, x, weight, stats, [&](BackwardBuffers& bb) {
    cuda::batch_renorm_act_backward(dtype_of(x.scalar_type()), bb.lay.x.const_data_ptr(), bb.dy.const_data_ptr(),
                                    bb.dx.mutable_data_ptr(), bb.cl, optional_ptr(bb.w),
                                    stats.const_data_ptr<float>(), bb.grads.mutable_data_ptr<float>(),
                                    bb.partial.mutable_data_ptr<double>(), bb.P, training,
                                    rng.const_data_ptr<int64_t>(), slope, drop, c10::cuda::getCurrentCUDAStream());
  });
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
  m.impl("batch_renorm_stats", &speckle::stats_cuda);
  m.impl("batch_renorm_act_forward", &speckle::act_forward_cuda);
  m.impl("batch_renorm_act_backward", &speckle::act_backward_cuda);
  m.impl("add_speckle_noise", &speckle::add_speckle_noise_cuda);
  m.impl("make_noisy_batch", &speckle::make_noisy_batch_cuda);
}
