// Entry points of the CPU kernels; arguments are checked by the caller (cpu_binding.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../api_common.h"
#include "../include/norm_block_math.h"
#include "../include/philox.h"

// float32 / float16 / bfloat16 only (no double instantiation).
#define SPECKLE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace speckle::cpu {

// at::empty_like(like) (in `dtype` if given) for a kernel's output: large ones come from the
// cache of output_cache.cpp, with transparent huge pages requested (Linux).
at::Tensor empty_output(const at::Tensor& like, std::optional<at::ScalarType> dtype = std::nullopt);

// Bytes the output cache holds idle, and freeing them (returns the bytes freed).
int64_t cpu_output_cache_idle_bytes();
int64_t empty_cpu_output_cache();

// Returns (y, stats (kStatRows, C) fp32); updates the running buffers when training.
std::tuple<at::Tensor, at::Tensor> batch_renorm_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched);

// Returns (dx in x's layout, dweight fp32 (C,), dbias fp32 (C,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_renorm_backward(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training);

// batch_renorm_forward's stats and running-buffer update, without y.
at::Tensor batch_renorm_stats(const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, at::Tensor& running_mean,
                              at::Tensor& running_std, at::Tensor& num_batches_tracked, bool training,
                              float momentum, float eps, const Schedule& r_sched, const Schedule& d_sched);

// The norm block's activation and dropout (csrc/include/norm_block_math.h), checked.
struct BlockParams {
  int activation;
  float slope;  // negative_side_slope
  DropoutParams dropout;
};

// batch_renorm_forward, then y = dropout(act(z)) in the same pass. Returns (y, stats).
std::tuple<at::Tensor, at::Tensor> batch_renorm_act_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched, const BlockParams& block);

// The BatchRenorm backward on g = act'(z) * mask * keep_scale * dy, z and the mask recomputed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_renorm_act_backward(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training, const BlockParams& block);

// Writes the noisy version of src (contiguous float, or uint8 when clean != nullptr) to out,
// and 2v-1 to clean. Sizes: images * numel_per_image elements.
void speckle_noise(const at::Tensor& src, at::Tensor& out, at::Tensor* clean, int64_t images,
                   const SpeckleParams& params);

// Lane widths of the built noise paths, widest (the default) first; 1 is the portable path.
std::vector<int64_t> noise_lane_widths();

// The Philox lane width to run (noise and dropout mask): SPECKLE_CPU_NOISE_LANES or the widest.
int64_t philox_lane_width();

}  // namespace speckle::cpu
