// What every CPU BatchRenorm pass shares: how a pass splits into tasks, how the per-channel
// schedule walks a channel, and the element hooks through which the norm block runs the very
// same passes. The passes themselves stand one a file, each readable top to bottom:
//   batch_renorm_stats.h     the statistics: (mean, M2) of u = x - pivot per channel
//   batch_renorm_forward.h   the forward: statistics, finalize, y = affine(x), both schedules
//   batch_renorm_backward.h  the backward: gradient sums, finalize, dx, both schedules
// The method (two passes each way, two schedules of the same bits) is in the header of
// batch_renorm_cpu.cpp; the vector loads and stores every pass uses are in vec_helpers.h.
//
// Tasks: chunks of at most kTaskElements values of one (n, c) plane (contiguous) or blocks of
// rows (channels-last), each writing its own partial in double; a channel's partials merge in a
// fixed order (n-major, then chunk; channels-last: task order), so neither the thread count nor
// the schedule changes a bit.
//
// Element hooks H (NoHooks for plain BatchRenorm; BlockHooks in batch_renorm_act_cpu.cpp):
//   H::kActive                 false compiles every loop to plain BatchRenorm (its bits and speed)
//   hooks.local()              the per-thread state h that the loops call
//   per_channel_saves_work()   whether the hooks' work shrinks under the per-channel schedule
//   h.chunk(c, first, len[, k])  binds a contiguous chunk of channel c (first: its first value's
//                              index; k: the per-channel schedule's chunk number)
//   h.out(i, y0, y1), h.out_cl(r, c, n, y0, y1)   forward epilogue: the affine result z -> y
//   h.grad(i, u0, u1, d0, d1), h.grad_cl(r, c, n, u0, u1, d0, d1)
//                              backward prologue: dy -> g, the gradient of the pre-activation,
//                              before it is summed or applied; u = (x - pivot) - offset, from
//                              which the hooks recompute z. A rewrite keeps a zero zero, so the
//                              tails' zero lanes still add nothing.
// The statistics pass takes no hooks: the block's forward changes only what follows it.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../api_common.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

constexpr int64_t kTaskElements = 16384;
constexpr int64_t kMinParallelElements = 32768;

inline int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(elements_per_task, 1));
}

// Whether contiguous passes run one channel per task (batch_renorm_cpu.cpp).
bool per_channel_schedule(const ChannelLayout& lay, bool saves_work);

// Plain BatchRenorm: no element hooks.
struct NoHooks {
  static constexpr bool kActive = false;
  NoHooks local() const { return {}; }
  bool per_channel_saves_work() const { return false; }
};

// How an element pass splits into tasks. Contiguous: chunks of at most kTaskElements values of
// one (n, c) plane; channels-last: blocks of `rows` rows of C values.
struct Tasks {
  int64_t count, per_task;  // tasks, and values (contiguous) or rows (channels-last) in each
  int64_t nchunks;          // contiguous only: chunks a plane
  int64_t elements;         // values a task covers, for the parallel grain

  explicit Tasks(const ChannelLayout& lay) {
    if (lay.channels_last) {
      per_task = std::clamp<int64_t>(kTaskElements / lay.C, 1, 1024);
      nchunks = 0;
      count = (lay.N * lay.L + per_task - 1) / per_task;
      elements = per_task * lay.C;
    } else {
      per_task = std::min(lay.L, kTaskElements);
      nchunks = (lay.L + per_task - 1) / per_task;
      count = lay.N * lay.C * nchunks;
      elements = per_task;
    }
  }
  // contiguous: task t -> (plane n*C + c, first value in the plane, values)
  void chunk(int64_t t, int64_t L, int64_t& plane, int64_t& start, int64_t& len) const {
    plane = t / nchunks;
    chunk_of_plane(t % nchunks, L, start, len);
  }
  // contiguous: chunk j of a plane -> (first value in the plane, values)
  void chunk_of_plane(int64_t j, int64_t L, int64_t& start, int64_t& len) const {
    start = j * per_task;
    len = chunk_len(j, L);
  }
  int64_t chunk_len(int64_t j, int64_t L) const { return std::min(per_task, L - j * per_task); }
  // channels-last: the rows of task t, [first, end)
  int64_t first_row(int64_t t) const { return t * per_task; }
  int64_t end_row(int64_t t, int64_t rows) const { return std::min(rows, (t + 1) * per_task); }
};

// The per-channel schedule (contiguous input): f(k, offset, len) for the k-th chunk of channel
// c, in merge order (n-major, then chunk): the split schedule's chunks, without its per-task
// division (planes can be 64 values long).
template <typename F>
inline void for_each_chunk_of_channel(const ChannelLayout& lay, const Tasks& tasks, int64_t c, const F& f) {
  for (int64_t nn = 0, k = 0; nn < lay.N; ++nn) {
    for (int64_t j = 0; j < tasks.nchunks; ++j, ++k) {
      int64_t start, len;
      tasks.chunk_of_plane(j, lay.L, start, len);
      f(k, (nn * lay.C + c) * lay.L + start, len);
    }
  }
}

// The per-channel schedule reads a channel's planes C*L values apart, a stride the hardware
// prefetchers do not follow, so with short planes each chunk's loads wait on memory, and the
// more work a chunk takes the fewer chunks' loads overlap: at (32, 512, 8, 8) fp32 (one thread)
// the moments made the per-channel forward ~1.6x as slow as the old one-pass sums without
// prefetching, ~1.35x with it (16 x 16 planes: ~1.1x and ~1x). So where planes are one chunk,
// a pass prefetches the plane kPrefetchPlanes on, of channel c or a next one of its thread's
// channels (those before `end`): plane_ahead gives its first value's index, or -1 for none.
constexpr int64_t kPrefetchPlanes = 4;
inline int64_t plane_ahead(const ChannelLayout& lay, const Tasks& tasks, int64_t c, int64_t end, int64_t k) {
  if (tasks.nchunks != 1) return -1;
  const int64_t ahead = k + kPrefetchPlanes, cc = c + ahead / lay.N;
  return cc < end ? ((ahead % lay.N) * lay.C + cc) * lay.L : -1;
}

// Prefetches the first (up to 1 KB) of len values at p.
template <typename T>
inline void prefetch_start(const T* p, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t n = std::min<int64_t>(len * static_cast<int64_t>(sizeof(T)), 1024);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(bytes + o);
}

}  // namespace speckle::cpu::CPU_CAPABILITY
