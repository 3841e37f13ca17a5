// The CPU kernels' entry points and how the binding reaches them; arguments are checked by the
// caller (cpu_binding.cpp).
//
// The vectorised kernels are compiled once per instruction set into this one library (the
// variants of csrc/variants/: DEFAULT, AVX2, AVX512_256), each into its own namespace
// speckle::cpu::<CPU_CAPABILITY> and each exporting a KernelTable; cpu_dispatch.cpp picks one
// table at load from what the CPU reports (SPECKLE_CPU_CAPABILITY overrides it), as ATen's
// DispatchStub does. Everything else is compiled for the baseline ISA only, so the library loads
// on any x86-64 CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>
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

// The norm block's activation and dropout (csrc/include/norm_block_math.h), checked.
struct BlockParams {
  int activation;
  float slope;  // negative_side_slope
  DropoutParams dropout;
};

// The entry points' signatures, declared once (each variant defines functions of these types).
// Forward: returns (y, stats (kStatRows, C) fp32); updates the running buffers when training.
using BatchRenormForwardFn = std::tuple<at::Tensor, at::Tensor>(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched);
// Backward: returns (dx in x's layout, dweight fp32 (C,), dbias fp32 (C,)).
using BatchRenormBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training);
// The forward's stats and running-buffer update, without y.
using BatchRenormStatsFn = at::Tensor(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched);
// The forward, then y = dropout(act(z)) in the same pass. Returns (y, stats).
using BatchRenormActForwardFn = std::tuple<at::Tensor, at::Tensor>(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched, const BlockParams& block);
// The backward on g = act'(z) * mask * keep_scale * dy, z and the mask recomputed.
using BatchRenormActBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training, const BlockParams& block);
// Writes the noisy version of src (contiguous float, or uint8 when clean != nullptr) to out,
// and 2v-1 to clean. Sizes: images * numel_per_image elements.
using SpeckleNoiseFn = void(const at::Tensor& src, at::Tensor& out, at::Tensor* clean, int64_t images,
                            const SpeckleParams& params);
// Lane widths of the variant's noise paths, widest (the default) first; 1 is the portable path.
using NoiseLaneWidthsFn = std::vector<int64_t>();

// One variant's kernels.
struct KernelTable {
  const char* name;  // "default", "avx2" or "avx512": the SPECKLE_CPU_CAPABILITY values
  BatchRenormForwardFn* batch_renorm_forward;
  BatchRenormBackwardFn* batch_renorm_backward;
  BatchRenormStatsFn* batch_renorm_stats;
  BatchRenormActForwardFn* batch_renorm_act_forward;
  BatchRenormActBackwardFn* batch_renorm_act_backward;
  SpeckleNoiseFn* speckle_noise;
  NoiseLaneWidthsFn* noise_lane_widths;
};

// cpu_dispatch.cpp. The table this process runs (chosen once); raises ValueError when
// SPECKLE_CPU_CAPABILITY names no variant.
const KernelTable& kernels();
// Its name; the built variants this CPU runs, least capable first; and, when the variant in use
// is not the one SPECKLE_CPU_CAPABILITY asked for, why ("" otherwise).
std::string cpu_capability();
std::vector<std::string> cpu_capabilities();
std::string cpu_capability_note();

}  // namespace speckle::cpu

#if defined(CPU_CAPABILITY)  // a kernel variant's translation unit (csrc/variants/)
namespace speckle::cpu::CPU_CAPABILITY {
BatchRenormForwardFn batch_renorm_forward;
BatchRenormBackwardFn batch_renorm_backward;
BatchRenormStatsFn batch_renorm_stats;
BatchRenormActForwardFn batch_renorm_act_forward;
BatchRenormActBackwardFn batch_renorm_act_backward;
SpeckleNoiseFn speckle_noise;
NoiseLaneWidthsFn noise_lane_widths;
// The Philox lane width to run (noise and dropout mask): SPECKLE_CPU_NOISE_LANES or the widest.
int64_t philox_lane_width();
}  // namespace speckle::cpu::CPU_CAPABILITY
#endif
