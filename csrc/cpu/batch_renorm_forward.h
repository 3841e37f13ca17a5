// The CPU BatchRenorm forward, shared by the plain ops (batch_renorm_cpu.cpp, whose header
// explains the method) and the norm block (batch_renorm_act_cpu.cpp, through element hooks):
//   statistics (batch_renorm_stats.h) -> finalize (stats rows, running-buffer update)
//   -> y = ((x - pivot) - offset) * scale + shift, then the hooks' epilogue (the block's
//      activation and dropout)
// Here, from the bottom up: the affine loops over a contiguous chunk and a channels-last task,
// the split schedule's affine pass, the per-channel schedule (a channel's statistics, finalize
// and affine back to back), and renorm_forward, which picks the schedule.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../api_common.h"
#include "batch_renorm_stats.h"
#include "batch_renorm_tasks.h"
#include "cpu_kernels.h"
#include "vec_helpers.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

// The affine pass's per-channel inputs (fp32, length C): rows of the stats.
struct AffineCoefs {
  const float* pivot;
  const float* offset;
  const float* scale;
  const float* shift;
};

// Over one chunk of a contiguous plane of channel c (h bound to it):
// out = ((x - pivot) - offset) * scale + shift, then h.out.
template <typename T, typename H>
inline void chunk_affine(const T* xp, T* op, int64_t len, int64_t c, const AffineCoefs& k, H& h) {
  const fVec p(k.pivot[c]), o(k.offset[c]), cx(k.scale[c]), c0(k.shift[c]);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1;
    load2(xp + i, x0, x1, n);
    const fVec u0 = (x0 - p) - o, u1 = (x1 - p) - o;
    fVec y0 = at::vec::fmadd(u0, cx, c0);
    fVec y1 = at::vec::fmadd(u1, cx, c0);
    if constexpr (H::kActive) h.out(i, y0, y1);
    store2(op + i, y0, y1, n);
  }
}

// Channels-last, rows [r0, r1) of C values: as chunk_affine, a row at a time.
template <typename T, typename H>
void channels_last_affine(const T* x, T* out, int64_t C, int64_t r0, int64_t r1, const AffineCoefs& k, H& h) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += kW) {
      const int64_t n = std::min(kW, C - c), off = r * C + c;
      fVec x0, x1, p0, p1, o0, o1, cx0, cx1, c00, c01;
      load2(x + off, x0, x1, n);
      load2(k.pivot + c, p0, p1, n);
      load2(k.offset + c, o0, o1, n);
      load2(k.scale + c, cx0, cx1, n);
      load2(k.shift + c, c00, c01, n);
      const fVec u0 = (x0 - p0) - o0, u1 = (x1 - p1) - o1;
      fVec y0 = at::vec::fmadd(u0, cx0, c00);
      fVec y1 = at::vec::fmadd(u1, cx1, c01);
      if constexpr (H::kActive) h.out_cl(r, c, n, y0, y1);
      store2(out + off, y0, y1, n);
    }
  }
}

// The split schedule's affine pass over all of x, every thread on tasks of every channel.
template <typename T, typename H>
void channel_affine(const ChannelLayout& lay, const T* x, T* out, const AffineCoefs& k, const H& hooks) {
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
        chunk_affine(x + base, out + base, len, plane % C, k, h);
      }
    });
    return;
  }
  const int64_t R = lay.N * lay.L;
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    auto h = hooks.local();
    for (int64_t t = begin; t < end; ++t) {
      channels_last_affine(x, out, C, tasks.first_row(t), tasks.end_row(t, R), k, h);
    }
  });
}

// The per-channel schedule of contiguous input: for each channel, its chunks' moments (as
// channel_moments) -> finalize(c, mean_u, m2), which writes channel c of the rows k points to
// -> its affine pass (as channel_affine), re-reading the channel from cache.
template <typename T, typename H, typename Finalize>
void per_channel_forward(const ChannelLayout& lay, const T* x, T* out, const float* pivot,
                         const AffineCoefs& k, const Finalize& finalize, const H& hooks) {
  const Tasks tasks(lay);
  at::parallel_for(0, lay.C, grain_for(lay.N * lay.L), [&](int64_t begin, int64_t end) {
    std::vector<MeanM2> partial(lay.N * tasks.nchunks);
    auto h = hooks.local();
    for (int64_t c = begin; c < end; ++c) {
      for_each_chunk_of_channel(lay, tasks, c, [&](int64_t j, int64_t off, int64_t len) {
        if (const int64_t ahead = plane_ahead(lay, tasks, c, end, j); ahead >= 0) prefetch_start(x + ahead, lay.L);
        partial[j] = chunk_moments(x + off, len, pivot[c]);
      });
      const MeanM2 m = merge_channel_moments(partial.data(), lay.N, tasks.nchunks, tasks.nchunks,
                                             [&](int64_t, int64_t j) { return tasks.chunk_len(j, lay.L); });
      finalize(c, m.mean, m.m2);
      for_each_chunk_of_channel(lay, tasks, c, [&](int64_t j, int64_t off, int64_t len) {
        if constexpr (H::kActive) h.chunk(c, off, len, j);
        chunk_affine(x + off, out + off, len, c, k, h);
      });
    }
  });
}

// The forward of every op: statistics, finalize (stats rows, running-buffer update), then,
// unless stats_only, y = hooks(affine) in x's layout (undefined when stats_only). The buffers
// are written only after every pass has run, so a throwing pass leaves them as they were.
template <typename H>
std::tuple<at::Tensor, at::Tensor> renorm_forward(
    const ChannelLayout& lay, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, at::Tensor& running_mean, at::Tensor& running_std,
    at::Tensor& num_batches_tracked, bool training, float momentum, float eps,
    const Schedule& r_sched, const Schedule& d_sched, bool stats_only, const H& hooks) {
  const int64_t C = lay.C;
  const at::Tensor rm = channel_floats(running_mean), rs = channel_floats(running_std);
  const at::Tensor w = weight ? channel_floats(*weight) : at::Tensor();
  const at::Tensor b = bias ? channel_floats(*bias) : at::Tensor();
  at::Tensor stats = at::empty({kStatRows, C}, lay.x.options().dtype(at::kFloat));
  at::Tensor new_rm = at::empty({C}, stats.options()), new_rs = at::empty({C}, stats.options());
  at::Tensor y = stats_only ? at::Tensor() : empty_output(lay.x);
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
    const AffineCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, st + kScale * C, st + kShift * C};
    scalar_t* out = stats_only ? nullptr : y.mutable_data_ptr<scalar_t>();
    if (training && !stats_only && per_channel_schedule(lay, hooks.per_channel_saves_work())) {
      per_channel_forward(lay, x, out, pivot.data(), affine_coefs, finalize, hooks);
      return;
    }
    std::vector<double> mean_u(C, 0.0), m2(C, 0.0);
    if (training) channel_moments(lay, x, pivot.data(), mean_u.data(), m2.data());
    for (int64_t c = 0; c < C; ++c) finalize(c, mean_u[c], m2[c]);
    if (!stats_only) channel_affine(lay, x, out, affine_coefs, hooks);
  });
  if (training) {
    running_mean.copy_(new_rm);
    running_std.copy_(new_rs);
    num_batches_tracked.add_(1);
  }
  return {y, stats};
}

}  // namespace speckle::cpu::CPU_CAPABILITY
