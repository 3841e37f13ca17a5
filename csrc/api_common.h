// Argument checks and the (N, C, L) layout view shared by the CPU and CUDA bindings.
//
// Supported (x is the input, C its channel count):
//   x                      float32 / float16 / bfloat16, >= 2 dims, non-empty
//   weight, bias           optional, (C,), any floating dtype, x's device
//   running_mean/_std      (C,), any floating dtype, x's device (updated in place)
//   num_batches_tracked    one int64 element, x's device (read and incremented)
//   layout                 contiguous NC*, or channels-last (NHWC / NDHWC / NLC) dense:
//                          both without a copy; any other strides are copied once
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "include/batch_renorm_math.h"

namespace speckle {

// x seen as planes: contiguous -> N*C planes of L contiguous values;
// channels_last -> N*L rows of C contiguous values.
struct ChannelLayout {
  at::Tensor x;  // the tensor the kernels read (x itself unless a copy was needed)
  bool channels_last;
  int64_t N, C, L;
};

inline ChannelLayout channel_layout(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t L = x.numel() / (N * C);
  if (x.is_contiguous()) return {x, L == 1, N, C, L};
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
  order.push_back(1);
  if (x.permute(order).is_contiguous()) return {x, true, N, C, L};
  return {x.contiguous(), false, N, C, L};
}

// t (x's shape) in x's memory layout, copied only when its strides differ.
inline at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

inline void check_float_input(const at::Tensor& x, const char* what) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, what,
              ": expected float32, float16 or bfloat16, got ", dt);
}

inline void check_channel_vector(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "batch_renorm: ", name, " must have shape (",
              x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "batch_renorm: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "batch_renorm: ", name,
              " must be floating point, got ", t.scalar_type());
}

inline Schedule schedule_from(at::ArrayRef<double> s, const char* name) {
  TORCH_CHECK(s.size() == 4, "batch_renorm: ", name, " must be [slope, start, low, high], got ",
              s.size(), " values");
  return {static_cast<float>(s[0]), static_cast<float>(s[1]), static_cast<float>(s[2]),
          static_cast<float>(s[3])};
}

inline void check_forward_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                               const at::Tensor& running_std, const at::Tensor& num_batches_tracked,
                               double momentum, double eps) {
  check_float_input(x, "batch_renorm: x");
  TORCH_CHECK(x.dim() >= 2, "batch_renorm: x must have at least 2 dims (N, C, ...), got ", x.dim());
  TORCH_CHECK(x.numel() > 0, "batch_renorm: x must be non-empty, got shape ", x.sizes());
  check_channel_vector(running_mean, x, "running_mean");
  check_channel_vector(running_std, x, "running_std");
  if (weight) check_channel_vector(*weight, x, "weight");
  if (bias) check_channel_vector(*bias, x, "bias");
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong,
              "batch_renorm: num_batches_tracked must be one int64 element, got ",
              num_batches_tracked.scalar_type(), " of shape ", num_batches_tracked.sizes());
  TORCH_CHECK(num_batches_tracked.device() == x.device(),
              "batch_renorm: num_batches_tracked is on ", num_batches_tracked.device(),
              " but x is on ", x.device());
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "batch_renorm: momentum must lie in [0, 1], got ",
              momentum);
  TORCH_CHECK(eps >= 0.0, "batch_renorm: eps must be >= 0, got ", eps);
}

inline void check_backward_args(const at::Tensor& dy, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor& stats) {
  check_float_input(x, "batch_renorm_backward: x");
  TORCH_CHECK(dy.sizes() == x.sizes(), "batch_renorm_backward: dy has shape ", dy.sizes(),
              " but x has ", x.sizes());
  TORCH_CHECK(dy.device() == x.device() && stats.device() == x.device(),
              "batch_renorm_backward: dy, x and stats must be on one device");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 &&
                  stats.size(0) == kStatRows && stats.size(1) == x.size(1) && stats.is_contiguous(),
              "batch_renorm_backward: stats must be a contiguous float32 (", int(kStatRows), ", ",
              x.size(1), ") tensor from batch_renorm_forward, got ", stats.scalar_type(), " ",
              stats.sizes());
  if (weight) check_channel_vector(*weight, x, "weight");
}

// Per-channel fp32 copy (or the tensor itself when it already is contiguous fp32).
inline at::Tensor channel_floats(const at::Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

}  // namespace speckle
