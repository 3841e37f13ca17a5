// The CPU BatchRenorm backward, shared by the plain ops (batch_renorm_cpu.cpp, whose header
// explains the method) and the norm block (batch_renorm_act_cpu.cpp, through element hooks):
//   g = dy, or the hooks' rewrite of it (the block: act'(z) * mask * keep_scale * dy)
//   sums S(g), S(g*u) per channel, u = (x - pivot) - offset
//   -> finalize_backward_channel (csrc/include/batch_renorm_math.h: dweight, dbias, A, B, mean_g)
//   -> dx = (g - mean_g) * A + u * B
// Here, from the bottom up: the sums over a contiguous chunk and a channels-last task, a
// channel's partials added, the split schedule's sums pass; the dx loops and the split
// schedule's dx pass; the per-channel schedule (a channel's sums, finalize and dx back to
// back); and renorm_backward, which picks the schedule.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../api_common.h"
#include "../include/batch_renorm_math.h"
#include "batch_renorm_tasks.h"
#include "cpu_kernels.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

// The fp32 sums span a block of at most kSumBlock values of a contiguous plane (64 a lane), or
// kClSumRows rows channels-last, before they go to double.
constexpr int64_t kSumBlock = 1024;
constexpr int64_t kClSumRows = 16;

// The backward's per-channel inputs (fp32, length C): rows of the stats (pivot, offset) and of
// the finalized gradients (B, A, mean_g; read by the dx pass only).
struct GradCoefs {
  const float* pivot;
  const float* offset;
  const float* coef_b;  // B, of u
  const float* coef_a;  // A, of g - mean_g
  const float* mean_g;
};

// A chunk's (contiguous) or a channel's part of a task (channels-last): S(g), S(g*u).
struct GradSums {
  double g, gu;
};

// S(g), S(g*u) over len values of a contiguous chunk (h bound to it). Tail lanes load dy = 0,
// and every rewrite keeps a zero zero, so they add nothing.
template <typename T, typename H>
inline GradSums chunk_grad_sums(const T* xp, const T* dp, int64_t len, float pivot, float offset, H& h) {
  const fVec p(pivot), o(offset);
  double sum_g = 0.0, sum_gu = 0.0;
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
    sum_g += hsum(a0 + a1);
    sum_gu += hsum(b0v + b1v);
  }
  return {sum_g, sum_gu};
}

// Channels-last, one task (rows [r0, r1) of C values): each channel's GradSums into out. Per
// block of kClSumRows rows, read from memory row by row into fp32 per-channel sums in scratch
// (2*C floats), added into double. (Walking the rows a channel group at a time cost ~30%.)
template <typename T, typename H>
void channels_last_grad_sums(const T* x, const T* dy, int64_t C, int64_t r0, int64_t r1, const GradCoefs& k,
                             float* scratch, GradSums* out, H& h) {
  float* sa = scratch;
  float* sb = scratch + C;
  std::fill(out, out + C, GradSums{0.0, 0.0});
  for (int64_t b0 = r0; b0 < r1; b0 += kClSumRows) {
    const int64_t b_end = std::min(r1, b0 + kClSumRows);
    std::fill(sa, sa + C, 0.0f);
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
      out[c].g += sa[c];
      out[c].gu += sb[c];
    }
  }
}

// One channel's partials added in double in the order both schedules use: `groups` groups
// (planes n, or channels-last tasks) `group_stride` partials apart, nchunks partials each.
inline GradSums add_channel_sums(const GradSums* first, int64_t groups, int64_t group_stride, int64_t nchunks) {
  double sg = 0.0, sgu = 0.0;
  for (int64_t g = 0; g < groups; ++g) {
    const GradSums* q = first + g * group_stride;
    for (int64_t j = 0; j < nchunks; ++j) {
      sg += q[j].g;
      sgu += q[j].gu;
    }
  }
  return {sg, sgu};
}

// The split schedule's sums pass: every thread on tasks of every channel, then each channel's
// partials added; S(g), S(g*u) of channel c into sum_g[c], sum_gu[c].
template <typename T, typename H>
void channel_grad_sums(const ChannelLayout& lay, const T* x, const T* dy, const GradCoefs& k, double* sum_g,
                       double* sum_gu, const H& hooks) {
  const int64_t C = lay.C;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    const int64_t L = lay.L, nchunks = tasks.nchunks;
    std::vector<GradSums> partial(tasks.count);
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      auto h = hooks.local();
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, L, plane, start, len);
        const int64_t off = plane * L + start, c = plane % C;
        if constexpr (H::kActive) h.chunk(c, off, len);
        partial[t] = chunk_grad_sums(x + off, dy + off, len, k.pivot[c], k.offset[c], h);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const GradSums s = add_channel_sums(partial.data() + c * nchunks, lay.N, C * nchunks, nchunks);
        sum_g[c] = s.g;
        sum_gu[c] = s.gu;
      }
    });
    return;
  }
  // channels-last: rows of C values; each task owns a block of rows and C partials.
  const int64_t R = lay.N * lay.L;
  std::vector<GradSums> partial(C * tasks.count);
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * C);
    auto h = hooks.local();
    for (int64_t t = begin; t < end; ++t) {
      channels_last_grad_sums(x, dy, C, tasks.first_row(t), tasks.end_row(t, R), k, scratch.data(),
                              partial.data() + C * t, h);
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const GradSums s = add_channel_sums(partial.data() + c, tasks.count, C, 1);
      sum_g[c] = s.g;
      sum_gu[c] = s.gu;
    }
  });
}

// Over one chunk of a contiguous plane of channel c (h bound to it):
// dx = ((x - pivot) - offset) * B + (g - mean_g) * A, g = dy or h.grad's rewrite.
template <typename T, typename H>
inline void chunk_dx(const T* xp, const T* dp, T* op, int64_t len, int64_t c, const GradCoefs& k, H& h) {
  const fVec p(k.pivot[c]), o(k.offset[c]), cx(k.coef_b[c]), c0(k.mean_g[c]), cdy(k.coef_a[c]);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1, d0, d1;
    load2(xp + i, x0, x1, n);
    const fVec u0 = (x0 - p) - o, u1 = (x1 - p) - o;
    load2(dp + i, d0, d1, n);
    if constexpr (H::kActive) h.grad(i, u0, u1, d0, d1);
    const fVec y0 = at::vec::fmadd(u0, cx, (d0 - c0) * cdy);
    const fVec y1 = at::vec::fmadd(u1, cx, (d1 - c0) * cdy);
    store2(op + i, y0, y1, n);
  }
}

// Channels-last, rows [r0, r1) of C values: as chunk_dx, a row at a time.
template <typename T, typename H>
void channels_last_dx(const T* x, const T* dy, T* out, int64_t C, int64_t r0, int64_t r1, const GradCoefs& k,
                      H& h) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += kW) {
      const int64_t n = std::min(kW, C - c), off = r * C + c;
      fVec x0, x1, p0, p1, o0, o1, cx0, cx1, c00, c01, d0, d1, cd0, cd1;
      load2(x + off, x0, x1, n);
      load2(k.pivot + c, p0, p1, n);
      load2(k.offset + c, o0, o1, n);
      load2(k.coef_b + c, cx0, cx1, n);
      load2(k.mean_g + c, c00, c01, n);
      const fVec u0 = (x0 - p0) - o0, u1 = (x1 - p1) - o1;
      load2(dy + off, d0, d1, n);
      load2(k.coef_a + c, cd0, cd1, n);
      if constexpr (H::kActive) h.grad_cl(r, c, n, u0, u1, d0, d1);
      const fVec y0 = at::vec::fmadd(u0, cx0, (d0 - c00) * cd0);
      const fVec y1 = at::vec::fmadd(u1, cx1, (d1 - c01) * cd1);
      store2(out + off, y0, y1, n);
    }
  }
}

// The split schedule's dx pass over all of x, every thread on tasks of every channel.
template <typename T, typename H>
void channel_dx(const ChannelLayout& lay, const T* x, const T* dy, T* out, const GradCoefs& k, const H& hooks) {
  const int64_t C = lay.C;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      auto h = hooks.local();
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, lay.L, plane, start, len);
        const int64_t base = plane * lay.L + start;
        if constexpr (H::kActive) h.chunk(plane % C, base, len);
        chunk_dx(x + base, dy + base, out + base, len, plane % C, k, h);
      }
    });
    return;
  }
  const int64_t R = lay.N * lay.L;
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    auto h = hooks.local();
    for (int64_t t = begin; t < end; ++t) {
      channels_last_dx(x, dy, out, C, tasks.first_row(t), tasks.end_row(t, R), k, h);
    }
  });
}

// The per-channel schedule of contiguous input: for each channel, its chunks' sums (as
// channel_grad_sums) -> finalize(c, sum_g, sum_gu), which writes channel c of the rows k points
// to -> its dx (as channel_dx), re-reading x and dy from cache. The block's hooks keep each
// chunk's dropout bits by chunk number, so the dx pass regenerates no mask.
template <typename T, typename H, typename Finalize>
void per_channel_backward(const ChannelLayout& lay, const T* x, const T* dy, T* out, const GradCoefs& k,
                          const Finalize& finalize, const H& hooks) {
  const Tasks tasks(lay);
  at::parallel_for(0, lay.C, grain_for(lay.N * lay.L), [&](int64_t begin, int64_t end) {
    std::vector<GradSums> partial(lay.N * tasks.nchunks);
    auto h = hooks.local();
    for (int64_t c = begin; c < end; ++c) {
      for_each_chunk_of_channel(lay, tasks, c, [&](int64_t j, int64_t off, int64_t len) {
        if (const int64_t ahead = plane_ahead(lay, tasks, c, end, j); ahead >= 0) {
          prefetch_start(x + ahead, lay.L);
          prefetch_start(dy + ahead, lay.L);
        }
        if constexpr (H::kActive) h.chunk(c, off, len, j);
        partial[j] = chunk_grad_sums(x + off, dy + off, len, k.pivot[c], k.offset[c], h);
      });
      const GradSums s = add_channel_sums(partial.data(), lay.N, tasks.nchunks, tasks.nchunks);
      finalize(c, s.g, s.gu);
      for_each_chunk_of_channel(lay, tasks, c, [&](int64_t j, int64_t off, int64_t len) {
        if constexpr (H::kActive) h.chunk(c, off, len, j);
        chunk_dx(x + off, dy + off, out + off, len, c, k, h);
      });
    }
  });
}

// The backward of every op: sums of g (dy, or the hooks' rewrite), finalize, dx = A*(g -
// mean_g) + B*u. Returns (dx in x's layout, dweight, dbias).
template <typename H>
std::tuple<at::Tensor, at::Tensor, at::Tensor> renorm_backward(
    const at::Tensor& dy_in, const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const at::Tensor& stats, bool training, const H& hooks) {
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
    auto finalize = [&](int64_t c, double sum_g, double sum_gu) {
      finalize_backward_channel(sum_g, sum_gu, count, st + c,
                                w.defined() ? w.const_data_ptr<float>()[c] : 1.0f, training, g + c, C);
    };
    const GradCoefs coefs{st + kPivot * C, st + kMeanOffset * C, g + kGradB * C, g + kGradA * C,
                          g + kGradMeanDy * C};
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    if (per_channel_schedule(lay, hooks.per_channel_saves_work())) {
      per_channel_backward(lay, x, d, out, coefs, finalize, hooks);
      return;
    }
    std::vector<double> sum_g(C), sum_gu(C);
    channel_grad_sums(lay, x, d, coefs, sum_g.data(), sum_gu.data(), hooks);
    for (int64_t c = 0; c < C; ++c) finalize(c, sum_g[c], sum_gu[c]);
    channel_dx(lay, x, d, out, coefs, hooks);
  });
  return {dx, grads[kGradWeight].clone(), grads[kGradBias].clone()};  // outputs must not alias
}

}  // namespace speckle::cpu::CPU_CAPABILITY
