// The statistics pass of the CPU BatchRenorm forward: per channel, (mean, M2) of u = x - pivot
// (pivot: the channel's first element), from which finalize_forward_channel
// (csrc/include/batch_renorm_math.h) makes the stats rows. Here, from the bottom up: one
// contiguous chunk's moments, one channels-last task's, a channel's partials merged, and the
// split schedule's pass over every channel. The per-channel schedule runs the same chunks and
// merge from batch_renorm_forward.h; the shared task frame is batch_renorm_tasks.h.
//
// Why two passes a block: a one-pass S(u), S(u^2) about the pivot loses a factor of about
// 1 + (mean - pivot)^2 / sigma^2 of its precision to cancellation; the sums of deviations from
// each block's own mean do not, and each block is read twice while it sits in L1, so the
// second read costs ALU work and no memory traffic. Blocks merge in double (Chan's formula).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../include/batch_renorm_math.h"
#include "batch_renorm_tasks.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

// The fp32 sums span a block of at most kMomentBlock values of a contiguous plane (128 a lane),
// or kClMomentRows rows channels-last, before they go to double. Each block costs a merge (3
// horizontal sums, divisions), which at 1024 values slowed the per-channel forward by ~10% at
// (32, 64, 128, 128) fp32 (the backward's sums, which cost no merge, use 1024); 16 KB still sits
// in L1 for the second pass.
constexpr int64_t kMomentBlock = 4096;
// Shorter blocks (planes of fewer values) skip the first pass and shift by the mean of their
// first kW values: the first pass costs a horizontal sum and a wait per block, which short
// planes pay every few values (the split forward at (32, 512, 8, 8) ran ~10% faster without
// it). With at most 32 terms a lane, a shift a few deviations off costs little.
constexpr int64_t kTwoPassMin = 1024;
constexpr int64_t kClMomentRows = 64;

// A chunk's (contiguous) or a channel's part of a task (channels-last): the mean of u and its
// sum of squared deviations.
struct MeanM2 {
  double mean, m2;
};

// (mean, M2) of u = x - pivot over len values at xp. Per block of kMomentBlock values (in L1):
// a shift m near the block's mean from a first pass (S(x)/len; its error does not matter;
// blocks under kTwoPassMin values use the mean of their first kW values), then S(x - m) and
// S((x - m)^2) from a second, M2 = S((x-m)^2) - S(x-m)^2/len (the corrected two-pass sums: no
// cancellation however far the data lie from the pivot); blocks merged in double
// (merge_moments). Four accumulators a quantity: the sums' add latency, not the loads, would
// bound two.
template <typename T>
inline MeanM2 chunk_moments(const T* xp, int64_t len, float pivot) {
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

// Channels-last, one task (rows [r0, r1) of C values): each channel's MeanM2 into out. Per
// block of kClMomentRows rows, S(x) read from memory row by row into fp32 per-channel sums in
// scratch (C floats), then the block's second pass of chunk_moments from cache, a group of kW
// channels at a time down the rows with register accumulators, merged per channel in double.
// (Walking the rows a channel group at a time from memory cost ~30%, measured on the backward's
// sums.)
template <typename T>
void channels_last_moments(const T* x, int64_t C, int64_t r0, int64_t r1, const float* pivot,
                           float* scratch, MeanM2* out) {
  float* sa = scratch;
  std::fill(out, out + C, MeanM2{0.0, 0.0});
  double done = 0.0;  // rows merged so far
  for (int64_t b0 = r0; b0 < r1; b0 += kClMomentRows) {
    const int64_t b_end = std::min(r1, b0 + kClMomentRows);
    std::fill(sa, sa + C, 0.0f);
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
        const double mean = (static_cast<double>(vm[j]) - pivot[c + j]) + sv * inv_count;
        const double delta = mean - out[c + j].mean;
        out[c + j].mean += delta * w;
        out[c + j].m2 += std::max(vq[j] - sv * sv * inv_count, 0.0) + delta * delta * done_w;
      }
    }
    done += rows;
  }
}

// One channel's partials merged by Chan's update in the order both schedules use: `groups`
// groups (planes n, or channels-last tasks) `group_stride` partials apart, nchunks partials
// each; count(g, j) is the number of values partial j of group g covers.
template <typename Count>
inline MeanM2 merge_channel_moments(const MeanM2* first, int64_t groups, int64_t group_stride,
                                    int64_t nchunks, const Count& count) {
  Moments acc{0.0, 0.0, 0.0};
  for (int64_t g = 0; g < groups; ++g) {
    const MeanM2* q = first + g * group_stride;
    for (int64_t j = 0; j < nchunks; ++j) merge_moments(acc, static_cast<double>(count(g, j)), q[j].mean, q[j].m2);
  }
  return {acc.mean, acc.m2};
}

// The pivots: each channel's first element (index (0, c, 0, ...)) as fp32.
template <typename T>
std::vector<float> first_elements(const ChannelLayout& lay, const T* x) {
  std::vector<float> p(lay.C);
  const int64_t stride_c = lay.channels_last ? 1 : lay.L;
  for (int64_t c = 0; c < lay.C; ++c) p[c] = static_cast<float>(x[c * stride_c]);
  return p;
}

// The split schedule's statistics pass: every thread on tasks of every channel, then each
// channel's partials merged; (mean of u, M2) of channel c into mean_u[c], m2[c].
template <typename T>
void channel_moments(const ChannelLayout& lay, const T* x, const float* pivot, double* mean_u, double* m2) {
  const int64_t C = lay.C;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    const int64_t L = lay.L, nchunks = tasks.nchunks;
    std::vector<MeanM2> partial(tasks.count);
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, L, plane, start, len);
        partial[t] = chunk_moments(x + plane * L + start, len, pivot[plane % C]);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const MeanM2 m = merge_channel_moments(partial.data() + c * nchunks, lay.N, C * nchunks, nchunks,
                                               [&](int64_t, int64_t j) { return tasks.chunk_len(j, L); });
        mean_u[c] = m.mean;
        m2[c] = m.m2;
      }
    });
    return;
  }
  // channels-last: rows of C values; each task owns a block of rows and C partials.
  const int64_t R = lay.N * lay.L;
  std::vector<MeanM2> partial(C * tasks.count);
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(C);
    for (int64_t t = begin; t < end; ++t) {
      channels_last_moments(x, C, tasks.first_row(t), tasks.end_row(t, R), pivot, scratch.data(),
                            partial.data() + C * t);
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const MeanM2 m = merge_channel_moments(partial.data() + c, tasks.count, C, 1, [&](int64_t t, int64_t) {
        return tasks.end_row(t, R) - tasks.first_row(t);
      });
      mean_u[c] = m.mean;
      m2[c] = m.m2;
    }
  });
}

}  // namespace speckle::cpu::CPU_CAPABILITY
