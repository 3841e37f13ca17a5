// The element loops of the CPU BatchRenorm passes over one chunk (a run of a contiguous plane)
// or one channels-last task (a block of rows); the schedules that call them are in
// batch_renorm_passes.h, the method in the header of batch_renorm_cpu.cpp.
//
// The loops take element hooks H so that the norm block (batch_renorm_act_cpu.cpp) runs the
// very same passes: H::kActive false (NoHooks, plain BatchRenorm) compiles to the loops as they
// were, so batch_renorm_forward/backward keep their bits and speed; an active H rewrites dy into
// the gradient g of the pre-activation before it is summed or applied (backward prologue), and
// the affine result z into the block's output (forward epilogue). Hooks see u = (x - pivot) -
// offset, from which they recompute z, and the position (chunk offset, or row and channel).
#pragma once

#include <algorithm>
#include <cstdint>

#include "../include/batch_renorm_math.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

// Plain BatchRenorm: no element hooks. local() gives the per-thread state of a hooks type;
// per_channel_saves_work() whether the hooks' work shrinks under the per-channel schedule.
struct NoHooks {
  static constexpr bool kActive = false;
  NoHooks local() const { return {}; }
  bool per_channel_saves_work() const { return false; }
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

// Backward: S(g), S(g*u) over len values of channel c, u = (x - pivot) - offset, g = dy or the
// hooks' rewrite of it (h bound to this chunk). Tail lanes load dy = 0, and every rewrite keeps
// a zero zero, so they add nothing.
template <typename T, typename H>
inline Partial chunk_grad_sums(const T* xp, const T* dp, int64_t len, float pivot, float offset, H& h) {
  const fVec p(pivot), o(offset);
  double sum_dy = 0.0, sum_dyz = 0.0;
  for (int64_t b0 = 0; b0 < len; b0 += kSumBlock) {
    const int64_t b_end = std::min(len, b0 + kSumBlock);
    fVec a0(0.0f), a1(0.0f), b0v(0.0f), b1v(0.0f);
    for (int64_t i = b0; i < b_end; i += kW) {
      const int64_t n = std::min(kW, b_end - i);
      fVec x0, x1, d0, d1;
      load2(xp + i, x0, x1, n);
      load2(dp + i, d0, d1, n);
      const fVec u0 = (x0 - p) - o, u1 = (x1 - p) - o;
      if constexpr (H::kActive) h.grad(i, u0, u1, d0, d1);
      a0 += d0;
      a1 += d1;
      b0v = at::vec::fmadd(d0, u0, b0v);
      b1v = at::vec::fmadd(d1, u1, b1v);
    }
    sum_dy += hsum(a0 + a1);
    sum_dyz += hsum(b0v + b1v);
  }
  return {sum_dy, sum_dyz};
}

// The partial of one chunk of a contiguous plane of channel c: forward (dp null) or backward.
template <typename T, typename H>
inline Partial chunk_partial(const T* xp, const T* dp, int64_t len, int64_t c, const ChannelCoefs& k, H& h) {
  if (dp == nullptr) return chunk_moments(xp, len, k.pivot[c]);
  return chunk_grad_sums(xp, dp, len, k.pivot[c], k.offset[c], h);
}

// Over one chunk of a contiguous plane of channel c (h bound to it):
//   forward  (dy null)  out = ((x - pivot) - offset) * scale + shift, then h.out
//   backward            out = ((x - pivot) - offset) * B + (g - mean_g) * A, g = dy or h.grad's
template <typename T, typename H>
inline void chunk_affine(const T* xp, const T* dp, T* op, int64_t len, int64_t c, const ChannelCoefs& k,
                         H& h) {
  const fVec p(k.pivot[c]), o(k.offset[c]), cx(k.coef_x[c]), c0(k.coef_0[c]);
  const fVec cdy(dp ? k.coef_dy[c] : 0.0f);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1, y0, y1;
    load2(xp + i, x0, x1, n);
    const fVec u0 = (x0 - p) - o, u1 = (x1 - p) - o;
    if (dp) {
      fVec d0, d1;
      load2(dp + i, d0, d1, n);
      if constexpr (H::kActive) h.grad(i, u0, u1, d0, d1);
      y0 = at::vec::fmadd(u0, cx, (d0 - c0) * cdy);
      y1 = at::vec::fmadd(u1, cx, (d1 - c0) * cdy);
    } else {
      y0 = at::vec::fmadd(u0, cx, c0);
      y1 = at::vec::fmadd(u1, cx, c0);
      if constexpr (H::kActive) h.out(i, y0, y1);
    }
    store2(op + i, y0, y1, n);
  }
}

// Channels-last, one task (rows [r0, r1) of C values): its Partial for each channel into out.
// Per block of rows (kClMomentRows forward, kClSumRows backward), read from memory row by row
// into fp32 per-channel sums in scratch (2*C floats): backward S(g), S(g*u), added into
// double; forward S(x), then the block's second pass of chunk_moments from cache, a group of
// kW channels at a time down the rows with register accumulators, merged per channel in
// double. (Walking the rows a channel group at a time from memory cost the backward ~30%.)
template <typename T, typename H>
void channels_last_task(const T* x, const T* dy, int64_t C, int64_t r0, int64_t r1,
                        const ChannelCoefs& k, float* scratch, Partial* out, H& h) {
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
          const fVec u0 = (x0 - p0) - o0, u1 = (x1 - p1) - o1;
          if constexpr (H::kActive) h.grad_cl(r, c, n, u0, u1, d0, d1);
          q0 = at::vec::fmadd(d0, u0, q0);
          q1 = at::vec::fmadd(d1, u1, q1);
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

// Channels-last affine pass over rows [r0, r1): as chunk_affine, a row of C values at a time.
template <typename T, typename H>
void channels_last_affine(const T* x, const T* dy, T* out, int64_t C, int64_t r0, int64_t r1,
                          const ChannelCoefs& k, H& h) {
  const bool has_dy = dy != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += kW) {
      const int64_t n = std::min(kW, C - c), off = r * C + c;
      fVec x0, x1, p0, p1, o0, o1, cx0, cx1, c00, c01, y0, y1;
      load2(x + off, x0, x1, n);
      load2(k.pivot + c, p0, p1, n);
      load2(k.offset + c, o0, o1, n);
      load2(k.coef_x + c, cx0, cx1, n);
      load2(k.coef_0 + c, c00, c01, n);
      const fVec u0 = (x0 - p0) - o0, u1 = (x1 - p1) - o1;
      if (has_dy) {
        fVec d0, d1, cd0, cd1;
        load2(dy + off, d0, d1, n);
        load2(k.coef_dy + c, cd0, cd1, n);
        if constexpr (H::kActive) h.grad_cl(r, c, n, u0, u1, d0, d1);
        y0 = at::vec::fmadd(u0, cx0, (d0 - c00) * cd0);
        y1 = at::vec::fmadd(u1, cx1, (d1 - c01) * cd1);
      } else {
        y0 = at::vec::fmadd(u0, cx0, c00);
        y1 = at::vec::fmadd(u1, cx1, c01);
        if constexpr (H::kActive) h.out_cl(r, c, n, y0, y1);
      }
      store2(out + off, y0, y1, n);
    }
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

}  // namespace speckle::cpu::CPU_CAPABILITY
