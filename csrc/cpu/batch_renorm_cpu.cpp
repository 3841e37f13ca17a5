// BatchRenorm forward/backward on the CPU: ATen vectors (vec_helpers.h) under at::parallel_for.
//
// Two element passes each way, as on the GPU (see csrc/include/batch_renorm_math.h for the
// per-channel math between them):
//   forward   (mean, M2) of u = x - pivot -> finalize -> y = (u - offset)*scale + shift
//   backward  sums of dy and dy*(u-offset) -> finalize (divides by sigma once, in double)
//             -> dx = (u-offset)*B + (dy-mean_dy)*A
// Work is split into tasks of ~kTaskElements values (a chunk of one (n, c) plane for contiguous
// input, a block of rows for channels-last), each writing its own partial in double; partials
// are merged per channel in a fixed order, so results do not depend on the thread count.
// Within a task, fp32 vector sums span blocks of at most a few thousand values of a channel
// (a block of rows channels-last) before they go to double. The forward reads each block
// twice while it is in L1: its mean, then the deviations from it (M2 without cancellation),
// blocks merged with Chan's formula: ALU work, no extra memory traffic. fp16/bf16 are widened
// to fp32 on load and rounded once on store.
//
// Two schedules run those passes over contiguous input, with the same chunks, the same
// partials and the same merge order (so the same bits):
//   split        each pass over all channels at once, every thread on chunks of every channel
//   per-channel  one channel per task: its sums, its finalize and its affine pass back to back,
//                so the affine pass re-reads the channel's N*L values (2 MB at (32, 64, 128, 128)
//                fp32) from cache, not memory: the forward reads x from memory once instead of
//                twice, the backward x and dy once instead of twice.
// per_channel_schedule picks per-channel where it pays (x beyond twice the last-level cache, or
// small) and whole channels balance across the threads; channels-last rows interleave every
// channel, so it always splits.
//
// The passes live one a file, each with both schedules, shared with the norm block
// (batch_renorm_act_cpu.cpp): batch_renorm_stats.h (statistics), batch_renorm_forward.h,
// batch_renorm_backward.h, on the task frame of batch_renorm_tasks.h. This file holds the
// schedule choice and the plain ops' entry points.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "batch_renorm_backward.h"
#include "batch_renorm_forward.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)
namespace {

constexpr int64_t kSmallBytes = int64_t{4} << 20;  // per_channel_schedule

// The last-level cache's size: the highest cache level Linux lists for cpu0, else 32 MB.
// (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) said 320 MB on this project's 32 MB-L3 machine.)
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best_level = 0, best_bytes = int64_t{32} << 20;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t level = 0, kb = 0;
      std::string unit;
      if (!(level_file >> level) || !(size_file >> kb >> unit) || unit != "K" || kb <= 0) continue;
      if (level > best_level) {
        best_level = level;
        best_bytes = kb << 10;
      }
    }
    return best_bytes;
  }();
  return bytes;
}

}  // namespace

// Whether contiguous passes run one channel per task. It pays where the split schedule reads x
// from memory twice, beyond the last-level cache, and on small tensors (<= 4 MB: one parallel
// region instead of three); in between the split schedule's long contiguous streams win.
// Measured with a 32 MB L3 in benchmarks/results/cpu-2026-11-25/cpu_paths.md (fp32: split
// faster at 32 MB, per-channel at 64 MB and 1.35x at 128 MB, split 1.6x at 16 MB). Whole channels must
// also balance across the threads (at most 1/8 of the thread time idle).
// saves_work: the per-channel schedule also saves element work (the norm block's backward
// regenerates its dropout mask once instead of twice; its forward's Philox runs beside a pass
// from cache rather than from memory), so only the balance decides.
// SPECKLE_CPU_RENORM_SCHEDULE=split|per-channel forces one (the tests run both).
bool per_channel_schedule(const ChannelLayout& lay, bool saves_work) {
  if (const char* forced = std::getenv("SPECKLE_CPU_RENORM_SCHEDULE"); forced && *forced) {
    const bool split = std::strcmp(forced, "split") == 0, per_channel = std::strcmp(forced, "per-channel") == 0;
    TORCH_CHECK_VALUE(split || per_channel || std::strcmp(forced, "auto") == 0,
                      "SPECKLE_CPU_RENORM_SCHEDULE must be auto, split or per-channel, got '", forced, "'");
    if (split || lay.channels_last) return false;
    if (per_channel) return true;
  }
  if (lay.channels_last) return false;
  const int64_t bytes = static_cast<int64_t>(lay.x.nbytes());
  if (!saves_work && bytes > kSmallBytes && bytes < 2 * last_level_cache_bytes()) return false;
  const int64_t threads = at::get_num_threads();
  const int64_t rounds = (lay.C + threads - 1) / threads;
  return 8 * rounds * threads <= 9 * lay.C;
}

std::tuple<at::Tensor, at::Tensor> batch_renorm_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched) {
  return renorm_forward(lay, weight, bias, running_mean, running_std, num_batches_tracked, training,
                        momentum, eps, r_sched, d_sched, /*stats_only=*/false, NoHooks{});
}

at::Tensor batch_renorm_stats(const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, at::Tensor& running_mean,
                              at::Tensor& running_std, at::Tensor& num_batches_tracked, bool training,
                              float momentum, float eps, const Schedule& r_sched, const Schedule& d_sched) {
  return std::get<1>(renorm_forward(lay, weight, bias, running_mean, running_std, num_batches_tracked,
                                    training, momentum, eps, r_sched, d_sched, /*stats_only=*/true,
                                    NoHooks{}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_renorm_backward(
    const at::Tensor& dy, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  return renorm_backward(dy, lay, weight, stats, training, NoHooks{});
}

}  // namespace speckle::cpu::CPU_CAPABILITY
