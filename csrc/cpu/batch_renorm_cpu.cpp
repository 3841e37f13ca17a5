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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "../api_common.h"
#include "cpu_kernels.h"
#include "vec_helpers.h"

namespace speckle::cpu {
namespace {

constexpr int64_t kTaskElements = 16384;
constexpr int64_t kMinParallelElements = 32768;
constexpr int64_t kSmallBytes = int64_t{4} << 20;  // per_channel_schedule

int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(elements_per_task, 1));
}

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
};

// Per-channel inputs of the element passes (fp32, length C).
struct ChannelCoefs {
  const float* pivot;
  const float* offset;
  const float* coef_x;   // scale / B in the affine passes (unused by the sums)
  const float* coef_dy;  // A in the backward affine pass
  const float* coef_0;   // shift (forward, added) / mean_dy (backward, subtracted from dy)
};

// The fp32 sums of a pass span a block of at most kMomentBlock (forward: 128 a lane) or
// kSumBlock (backward: 64 a lane) values of a contiguous plane, or kClMomentRows / kClSumRows
// rows (channels-last), before they go to double. The forward's blocks are larger because each
// costs a merge (3 horizontal sums, divisions), which at 1024 values slowed the per-channel
// forward by ~10% at (32, 64, 128, 128) fp32; 16 KB still sits in L1 for the second pass.
constexpr int64_t kMomentBlock = 4096;
// Shorter blocks (planes of fewer values) skip the forward's first pass and shift by the mean
// of their first kW values: the first pass costs a horizontal sum and a wait per block, which
// short planes pay every few values (the split forward at (32, 512, 8, 8) ran ~10% faster
// without it). With at most 32 terms a lane, a shift a few deviations off costs little.
constexpr int64_t kTwoPassMin = 1024;
constexpr int64_t kSumBlock = 1024;
constexpr int64_t kClMomentRows = 64;
constexpr int64_t kClSumRows = 16;

// One chunk's (contiguous) or task's (channels-last, per channel) result, in double:
// forward (mean, M2) of u = x - pivot, backward (S(dy), S(dy*z)).
struct Partial {
  double a, b;
};

// Forward: (mean, M2) of u = x - pivot over len values at xp. Per block of kMomentBlock values
// (in L1): a shift m near the block's mean from a first pass (S(x)/len; its error does not
// matter; blocks under kTwoPassMin values use the mean of their first kW values), then
// S(x - m) and S((x - m)^2) from a second, M2 = S((x-m)^2) - S(x-m)^2/len (the corrected
// two-pass sums: no cancellation however far the data lie from the pivot); blocks merged in
// double (merge_moments). Four accumulators a quantity: the sums' add latency, not the loads,
// would bound two.
template <typename T>
inline Partial chunk_moments(const T* xp, int64_t len, float pivot) {
  Moments acc{0.0, 0.0, 0.0};
  for (int64_t b0 = 0; b0 < len; b0 += kMomentBlock) {
    const T* xb = xp + b0;
    const int64_t bl = std::min(kMomentBlock, len - b0);
    const double count = static_cast<double>(bl), inv_count = 1.0 / count;
    int64_t i = 0;
    float m;
    if (bl >= kTwoPassMin) {
      fVec s0(0.0f), s1(0.0f), s2(0.0f), s3(0.0f);
      for (; i + 2 * kW <= bl; i += 2 * kW) {
        fVec x0, x1, x2, x3;
        load2(xb + i, x0, x1);
        load2(xb + i + kW, x2, x3);
        s0 += x0;
        s1 += x1;
        s2 += x2;
        s3 += x3;
      }
      for (; i < bl; i += kW) {
        fVec x0, x1;
        load2(xb + i, x0, x1, std::min(kW, bl - i));  // zero past the end: adds nothing
        s0 += x0;
        s1 += x1;
      }
      m = static_cast<float>(hsum((s0 + s1) + (s2 + s3)) * inv_count);
    } else {  // one pass about the mean of the first values (see kTwoPassMin)
      const int64_t n = std::min(kW, bl);
      fVec x0, x1;
      load2(xb, x0, x1, n);
      m = hsum(x0 + x1) / static_cast<float>(n);
    }
    const fVec mv(m);
    fVec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f), q0(0.0f), q1(0.0f), q2(0.0f), q3(0.0f);
    for (i = 0; i + 2 * kW <= bl; i += 2 * kW) {
      fVec x0, x1, x2, x3;
      load2(xb + i, x0, x1);
      load2(xb + i + kW, x2, x3);
      const fVec v0 = x0 - mv, v1 = x1 - mv, v2 = x2 - mv, v3 = x3 - mv;
      a0 += v0;
      a1 += v1;
      a2 += v2;
      a3 += v3;
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
      q2 = at::vec::fmadd(v2, v2, q2);
      q3 = at::vec::fmadd(v3, v3, q3);
    }
    for (; i < bl; i += kW) {
      const int64_t n = std::min(kW, bl - i);
      fVec x0, x1;
      load2(xb + i, x0, x1, n);
      fVec v0 = x0 - mv, v1 = x1 - mv;
      if (n < kW) keep_first(v0, v1, n);
      a0 += v0;
      a1 += v1;
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
    }
    const double sv = hsum((a0 + a1) + (a2 + a3)), sq = hsum((q0 + q1) + (q2 + q3));
    merge_moments(acc, count, (static_cast<double>(m) - pivot) + sv * inv_count,
                  std::max(sq - sv * sv * inv_count, 0.0));
  }
  return {acc.mean, acc.m2};
}

// Backward: S(dy), S(dy*u) over len values of channel c, u = (x - pivot) - offset.
template <typename T>
inline Partial chunk_grad_sums(const T* xp, const T* dp, int64_t len, float pivot, float offset) {
  const fVec p(pivot), o(offset);
  double sum_dy = 0.0, sum_dyz = 0.0;
  for (int64_t b0 = 0; b0 < len; b0 += kSumBlock) {
    const int64_t b_end = std::min(len, b0 + kSumBlock);
    fVec a0(0.0f), a1(0.0f), b0v(0.0f), b1v(0.0f);
    for (int64_t i = b0; i < b_end; i += kW) {
      const int64_t n = std::min(kW, b_end - i);
      fVec x0, x1, d0, d1;
      load2(xp + i, x0, x1, n);
      load2(dp + i, d0, d1, n);  // zero past n, so the tail adds nothing
      a0 += d0;
      a1 += d1;
      b0v = at::vec::fmadd(d0, (x0 - p) - o, b0v);
      b1v = at::vec::fmadd(d1, (x1 - p) - o, b1v);
    }
    sum_dy += hsum(a0 + a1);
    sum_dyz += hsum(b0v + b1v);
  }
  return {sum_dy, sum_dyz};
}

// The partial of one chunk of a contiguous plane of channel c: forward (dp null) or backward.
template <typename T>
inline Partial chunk_partial(const T* xp, const T* dp, int64_t len, int64_t c, const ChannelCoefs& k) {
  if (dp == nullptr) return chunk_moments(xp, len, k.pivot[c]);
  return chunk_grad_sums(xp, dp, len, k.pivot[c], k.offset[c]);
}

// Over one chunk of a contiguous plane of channel c:
//   forward  (dy null)  out = ((x - pivot) - offset) * scale + shift
//   backward            out = ((x - pivot) - offset) * B + (dy - mean_dy) * A
template <typename T>
inline void chunk_affine(const T* xp, const T* dp, T* op, int64_t len, int64_t c,
                         const ChannelCoefs& k) {
  const fVec p(k.pivot[c]), o(k.offset[c]), cx(k.coef_x[c]), c0(k.coef_0[c]);
  const fVec cdy(dp ? k.coef_dy[c] : 0.0f);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1, y0, y1;
    load2(xp + i, x0, x1, n);
    if (dp) {
      fVec d0, d1;
      load2(dp + i, d0, d1, n);
      y0 = at::vec::fmadd((x0 - p) - o, cx, (d0 - c0) * cdy);
      y1 = at::vec::fmadd((x1 - p) - o, cx, (d1 - c0) * cdy);
    } else {
      y0 = at::vec::fmadd((x0 - p) - o, cx, c0);
      y1 = at::vec::fmadd((x1 - p) - o, cx, c0);
    }
    store2(op + i, y0, y1, n);
  }
}

// One channel's partials merged in double in the order both schedules use: `groups` groups
// (planes n, or channels-last tasks) `group_stride` partials apart, nchunks partials each;
// count(g, j) is the number of values partial j of group g covers. Forward: Chan's update;
// backward: sums.
template <typename Count>
inline Partial merge_channel(const Partial* first, int64_t groups, int64_t group_stride,
                             int64_t nchunks, bool bwd, const Count& count) {
  Moments acc{0.0, 0.0, 0.0};
  double sa = 0.0, sb = 0.0;
  for (int64_t g = 0; g < groups; ++g) {
    const Partial* q = first + g * group_stride;
    for (int64_t j = 0; j < nchunks; ++j) {
      if (bwd) {
        sa += q[j].a;
        sb += q[j].b;
      } else {
        merge_moments(acc, static_cast<double>(count(g, j)), q[j].a, q[j].b);
      }
    }
  }
  return bwd ? Partial{sa, sb} : Partial{acc.mean, acc.m2};
}

// Channels-last, one task (rows [r0, r1) of C values): its Partial for each channel into out.
// Per block of rows (kClMomentRows forward, kClSumRows backward), read from memory row by row
// into fp32 per-channel sums in scratch (2*C floats): backward S(dy), S(dy*z), added into
// double; forward S(x), then the block's second pass of chunk_moments from cache, a group of
// kW channels at a time down the rows with register accumulators, merged per channel in
// double. (Walking the rows a channel group at a time from memory cost the backward ~30%.)
template <typename T>
void channels_last_task(const T* x, const T* dy, int64_t C, int64_t r0, int64_t r1,
                        const ChannelCoefs& k, float* scratch, Partial* out) {
  float* sa = scratch;
  float* sb = scratch + C;
  std::fill(out, out + C, Partial{0.0, 0.0});
  const int64_t block_rows = dy != nullptr ? kClSumRows : kClMomentRows;
  double done = 0.0;  // rows merged so far
  for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
    const int64_t b_end = std::min(r1, b0 + block_rows);
    std::fill(sa, sa + C, 0.0f);
    if (dy != nullptr) {
      std::fill(sb, sb + C, 0.0f);
      for (int64_t r = b0; r < b_end; ++r) {
        for (int64_t c = 0; c < C; c += kW) {
          const int64_t n = std::min(kW, C - c), off = r * C + c;
          fVec x0, x1, d0, d1, p0, p1, o0, o1, a0, a1, q0, q1;
          load2(x + off, x0, x1, n);
          load2(dy + off, d0, d1, n);
          load2(k.pivot + c, p0, p1, n);
          load2(k.offset + c, o0, o1, n);
          load2(sa + c, a0, a1, n);
          load2(sb + c, q0, q1, n);
          q0 = at::vec::fmadd(d0, (x0 - p0) - o0, q0);
          q1 = at::vec::fmadd(d1, (x1 - p1) - o1, q1);
          store2(sa + c, a0 + d0, a1 + d1, n);  // lanes past n are never stored
          store2(sb + c, q0, q1, n);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        out[c].a += sa[c];
        out[c].b += sb[c];
      }
      continue;
    }
    for (int64_t r = b0; r < b_end; ++r) {
      for (int64_t c = 0; c < C; c += kW) {
        const int64_t n = std::min(kW, C - c);
        fVec x0, x1, s0, s1;
        load2(x + r * C + c, x0, x1, n);
        load2(sa + c, s0, s1, n);
        store2(sa + c, s0 + x0, s1 + x1, n);
      }
    }
    const double rows = static_cast<double>(b_end - b0), inv_count = 1.0 / rows;
    const double w = rows / (done + rows), done_w = done * w;  // merge_moments' weights, shared
    const fVec inv_rows(1.0f / static_cast<float>(rows));
    alignas(64) float vm[kW], va[kW], vq[kW];
    for (int64_t c = 0; c < C; c += kW) {
      const int64_t n = std::min(kW, C - c);
      fVec m0, m1, a0(0.0f), a1(0.0f), q0(0.0f), q1(0.0f);
      load2(sa + c, m0, m1, n);
      m0 = m0 * inv_rows;  // the shift m, near the block's mean
      m1 = m1 * inv_rows;
      for (int64_t r = b0; r < b_end; ++r) {
        fVec x0, x1;
        load2(x + r * C + c, x0, x1, n);
        const fVec v0 = x0 - m0, v1 = x1 - m1;
        a0 += v0;
        a1 += v1;
        q0 = at::vec::fmadd(v0, v0, q0);
        q1 = at::vec::fmadd(v1, v1, q1);
      }
      store2(vm, m0, m1);
      store2(va, a0, a1);
      store2(vq, q0, q1);
      for (int64_t j = 0; j < n; ++j) {  // merge_moments with the shared weights
        const double sv = va[j];
        const double mean = (static_cast<double>(vm[j]) - k.pivot[c + j]) + sv * inv_count;
        const double delta = mean - out[c + j].a;
        out[c + j].a += delta * w;
        out[c + j].b += std::max(vq[j] - sv * sv * inv_count, 0.0) + delta * delta * done_w;
      }
    }
    done += rows;
  }
}

// Per channel (a, b): forward (dy null) (mean, M2) of u, backward (S(dy), S(dy*z)).
template <typename T>
void channel_sums(const ChannelLayout& lay, const T* x, const T* dy, const ChannelCoefs& k,
                  double* sum_a, double* sum_b) {
  const int64_t C = lay.C;
  const bool bwd = dy != nullptr;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    const int64_t L = lay.L, nchunks = tasks.nchunks;
    std::vector<Partial> partial(tasks.count);
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, L, plane, start, len);
        partial[t] = chunk_partial(x + plane * L + start, bwd ? dy + plane * L + start : nullptr,
                                   len, plane % C, k);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Partial m = merge_channel(partial.data() + c * nchunks, lay.N, C * nchunks, nchunks, bwd,
                                        [&](int64_t, int64_t j) { return tasks.chunk_len(j, L); });
        sum_a[c] = m.a;
        sum_b[c] = m.b;
      }
    });
    return;
  }
  // channels-last: rows of C values; each task owns a block of rows and C partials.
  const int64_t R = lay.N * lay.L, rows = tasks.per_task;
  std::vector<Partial> partial(C * tasks.count);
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * C);
    for (int64_t t = begin; t < end; ++t) {
      channels_last_task(x, dy, C, t * rows, std::min(R, (t + 1) * rows), k, scratch.data(),
                         partial.data() + C * t);
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Partial m = merge_channel(partial.data() + c, tasks.count, C, 1, bwd, [&](int64_t t, int64_t) {
        return std::min(R, (t + 1) * rows) - t * rows;
      });
      sum_a[c] = m.a;
      sum_b[c] = m.b;
    }
  });
}

// The affine pass of chunk_affine over all of x (dy optional).
template <typename T>
void channel_affine(const ChannelLayout& lay, const T* x, const T* dy, T* out, const ChannelCoefs& k) {
  const int64_t C = lay.C;
  const bool has_dy = dy != nullptr;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, lay.L, plane, start, len);
        const int64_t base = plane * lay.L + start;
        chunk_affine(x + base, has_dy ? dy + base : nullptr, out + base, len, plane % C, k);
      }
    });
    return;
  }
  const int64_t R = lay.N * lay.L, rows = tasks.per_task;
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r_end = std::min(R, (t + 1) * rows);
      for (int64_t r = t * rows; r < r_end; ++r) {
        for (int64_t c = 0; c < C; c += kW) {
          const int64_t n = std::min(kW, C - c), off = r * C + c;
          fVec x0, x1, p0, p1, o0, o1, cx0, cx1, c00, c01, y0, y1;
          load2(x + off, x0, x1, n);
          load2(k.pivot + c, p0, p1, n);
          load2(k.offset + c, o0, o1, n);
          load2(k.coef_x + c, cx0, cx1, n);
          load2(k.coef_0 + c, c00, c01, n);
          if (has_dy) {
            fVec d0, d1, cd0, cd1;
            load2(dy + off, d0, d1, n);
            load2(k.coef_dy + c, cd0, cd1, n);
            y0 = at::vec::fmadd((x0 - p0) - o0, cx0, (d0 - c00) * cd0);
            y1 = at::vec::fmadd((x1 - p1) - o1, cx1, (d1 - c01) * cd1);
          } else {
            y0 = at::vec::fmadd((x0 - p0) - o0, cx0, c00);
            y1 = at::vec::fmadd((x1 - p1) - o1, cx1, c01);
          }
          store2(out + off, y0, y1, n);
        }
      }
    }
  });
}

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

// Whether contiguous passes run one channel per task. It pays where the split schedule reads x
// from memory twice, beyond the last-level cache, and on small tensors (<= 4 MB: one parallel
// region instead of three); in between the split schedule's long contiguous streams win.
// Measured with a 32 MB L3 in benchmarks/results/cpu-2026-11-25/cpu_paths.md (fp32: split
// faster at 32 MB, per-channel at 64 MB and 1.35x at 128 MB, split 1.6x at 16 MB). Whole channels must
// also balance across the threads (at most 1/8 of the thread time idle).
// SPECKLE_CPU_RENORM_SCHEDULE=split|per-channel forces one (the tests run both).
bool per_channel_schedule(const ChannelLayout& lay) {
  if (const char* forced = std::getenv("SPECKLE_CPU_RENORM_SCHEDULE"); forced && *forced) {
    const bool split = std::strcmp(forced, "split") == 0, per_channel = std::strcmp(forced, "per-channel") == 0;
    TORCH_CHECK_VALUE(split || per_channel || std::strcmp(forced, "auto") == 0,
                      "SPECKLE_CPU_RENORM_SCHEDULE must be auto, split or per-channel, got '", forced, "'");
    if (split || lay.channels_last) return false;
    if (per_channel) return true;
  }
  if (lay.channels_last) return false;
  const int64_t bytes = static_cast<int64_t>(lay.x.nbytes());
  if (bytes > kSmallBytes && bytes < 2 * last_level_cache_bytes()) return false;
  const int64_t threads = at::get_num_threads();
  const int64_t rounds = (lay.C + threads - 1) / threads;
  return 8 * rounds * threads <= 9 * lay.C;
}

// Prefetches the first (up to 1 KB) of len values at p. The per-channel schedule reads a
// channel's planes C*L values apart, a stride the hardware prefetchers do not follow, so with
// short planes each chunk's loads wait on memory, and the more work a chunk takes the fewer
// chunks' loads overlap: at (32, 512, 8, 8) fp32 (one thread) the moments made the per-channel
// forward ~1.6x as slow as the old one-pass sums without this, ~1.35x with it (16 x 16 planes:
// ~1.1x and ~1x).
constexpr int64_t kPrefetchPlanes = 4;
template <typename T>
inline void prefetch_start(const T* p, int64_t len) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t n = std::min<int64_t>(len * static_cast<int64_t>(sizeof(T)), 1024);
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(bytes + o);
}

// The per-channel schedule of contiguous input: for each channel, partials (sum_coefs, as
// channel_sums) -> finalize(c, a, b), which writes channel c of the arrays affine_coefs points
// to -> affine (as channel_affine). dy: backward, null: forward.
template <typename T, typename Finalize>
void per_channel_passes(const ChannelLayout& lay, const T* x, const T* dy, T* out,
                        const ChannelCoefs& sum_coefs, const ChannelCoefs& affine_coefs,
                        const Finalize& finalize) {
  const Tasks tasks(lay);
  const int64_t C = lay.C, L = lay.L, nchunks = tasks.nchunks;
  // f(k, offset, len) for the k-th chunk of channel c, in merge order (n-major, then chunk):
  // the split schedule's chunks, without its per-task division (planes can be 64 values long).
  auto for_each_chunk = [&](int64_t c, const auto& f) {
    for (int64_t nn = 0, k = 0; nn < lay.N; ++nn) {
      for (int64_t j = 0; j < nchunks; ++j, ++k) {
        int64_t start, len;
        tasks.chunk_of_plane(j, L, start, len);
        f(k, (nn * C + c) * L + start, len);
      }
    }
  };
  at::parallel_for(0, C, grain_for(lay.N * L), [&](int64_t begin, int64_t end) {
    std::vector<Partial> partial(lay.N * nchunks);
    for (int64_t c = begin; c < end; ++c) {
      for_each_chunk(c, [&](int64_t k, int64_t off, int64_t len) {
        if (nchunks == 1) {  // short planes: the plane kPrefetchPlanes on, of c or a next channel
          const int64_t ahead = k + kPrefetchPlanes, cc = c + ahead / lay.N;
          if (cc < end) {
            const int64_t at = ((ahead % lay.N) * C + cc) * L;
            prefetch_start(x + at, L);
            if (dy) prefetch_start(dy + at, L);
          }
        }
        partial[k] = chunk_partial(x + off, dy ? dy + off : nullptr, len, c, sum_coefs);
      });
      const Partial m = merge_channel(partial.data(), lay.N, nchunks, nchunks, dy != nullptr,
                                      [&](int64_t, int64_t j) { return tasks.chunk_len(j, L); });
      finalize(c, m.a, m.b);
      for_each_chunk(c, [&](int64_t, int64_t off, int64_t len) {
        chunk_affine(x + off, dy ? dy + off : nullptr, out + off, len, c, affine_coefs);
      });
    }
  });
}

// The channel's first element (index (0, c, 0, ...)) as fp32, for each channel.
template <typename T>
std::vector<float> first_elements(const ChannelLayout& lay, const T* x) {
  std::vector<float> p(lay.C);
  const int64_t stride_c = lay.channels_last ? 1 : lay.L;
  for (int64_t c = 0; c < lay.C; ++c) p[c] = static_cast<float>(x[c * stride_c]);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_renorm_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched) {
  const int64_t C = lay.C;
  const at::Tensor rm = channel_floats(running_mean), rs = channel_floats(running_std);
  const at::Tensor w = weight ? channel_floats(*weight) : at::Tensor();
  const at::Tensor b = bias ? channel_floats(*bias) : at::Tensor();
  at::Tensor stats = at::empty({kStatRows, C}, lay.x.options().dtype(at::kFloat));
  at::Tensor new_rm = at::empty({C}, stats.options()), new_rs = at::empty({C}, stats.options());
  at::Tensor y = empty_output(lay.x);
  SPECKLE_DISPATCH_FLOAT_TYPES(lay.x.scalar_type(), "batch_renorm_forward_cpu", [&] {
    const scalar_t* x = lay.x.const_data_ptr<scalar_t>();
    const float t = static_cast<float>(num_batches_tracked.item<int64_t>());
    const double count = static_cast<double>(lay.N) * static_cast<double>(lay.L);
    const std::vector<float> pivot = training ? first_elements(lay, x) : std::vector<float>(C, 0.0f);
    float* st = stats.data_ptr<float>();
    auto finalize = [&](int64_t c, double mean_u, double m2) {
      const ForwardChannelIn in{mean_u, m2, count, pivot[c], rm.const_data_ptr<float>()[c],
                                rs.const_data_ptr<float>()[c],
                                w.defined() ? w.const_data_ptr<float>()[c] : 1.0f,
                                b.defined() ? b.const_data_ptr<float>()[c] : 0.0f};
      finalize_forward_channel(in, training, eps, momentum, t, r_sched, d_sched, st + c, C,
                               new_rm.data_ptr<float>() + c, new_rs.data_ptr<float>() + c);
    };
    const ChannelCoefs sum_coefs{pivot.data(), nullptr, nullptr, nullptr, nullptr};
    const ChannelCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, st + kScale * C, nullptr,
                                    st + kShift * C};
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if (training && per_channel_schedule(lay)) {
      per_channel_passes(lay, x, static_cast<const scalar_t*>(nullptr), out, sum_coefs, affine_coefs,
                         finalize);
      return;
    }
    std::vector<double> mean_u(C, 0.0), m2(C, 0.0);
    if (training) channel_sums<scalar_t>(lay, x, nullptr, sum_coefs, mean_u.data(), m2.data());
    for (int64_t c = 0; c < C; ++c) finalize(c, mean_u[c], m2[c]);
    channel_affine<scalar_t>(lay, x, nullptr, out, affine_coefs);
  });
  if (training) {
    running_mean.copy_(new_rm);
    running_std.copy_(new_rs);
    num_batches_tracked.add_(1);
  }
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_renorm_backward(
    const at::Tensor& dy_in, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training) {
  const int64_t C = lay.C;
  const at::Tensor dy = match_layout(dy_in.to(lay.x.scalar_type()), lay.x);
  const at::Tensor w = weight ? channel_floats(*weight) : at::Tensor();
  at::Tensor grads = at::empty({kGradRows, C}, stats.options());
  at::Tensor dx = empty_output(lay.x);
  SPECKLE_DISPATCH_FLOAT_TYPES(lay.x.scalar_type(), "batch_renorm_backward_cpu", [&] {
    const scalar_t* x = lay.x.const_data_ptr<scalar_t>();
    const scalar_t* d = dy.const_data_ptr<scalar_t>();
    const float* st = stats.const_data_ptr<float>();
    const double count = static_cast<double>(lay.N) * static_cast<double>(lay.L);
    float* g = grads.data_ptr<float>();
    auto finalize = [&](int64_t c, double sum_dy, double sum_dyz) {
      finalize_backward_channel(sum_dy, sum_dyz, count, st + c,
                                w.defined() ? w.const_data_ptr<float>()[c] : 1.0f, training, g + c, C);
    };
    const ChannelCoefs sum_coefs{st + kPivot * C, st + kMeanOffset * C, nullptr, nullptr, nullptr};
    const ChannelCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, g + kGradB * C,
                                    g + kGradA * C, g + kGradMeanDy * C};
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    if (per_channel_schedule(lay)) {
      per_channel_passes(lay, x, d, out, sum_coefs, affine_coefs, finalize);
      return;
    }
    std::vector<double> sum_dy(C), sum_dyz(C);
    channel_sums<scalar_t>(lay, x, d, sum_coefs, sum_dy.data(), sum_dyz.data());
    for (int64_t c = 0; c < C; ++c) finalize(c, sum_dy[c], sum_dyz[c]);
    channel_affine<scalar_t>(lay, x, d, out, affine_coefs);
  });
  return {dx, grads[kGradWeight].clone(), grads[kGradBias].clone()};  // outputs must not alias
}

}  // namespace speckle::cpu
