// The CPU BatchRenorm passes and their two schedules, shared by the plain ops
// (batch_renorm_cpu.cpp, whose header explains the method) and the norm block
// (batch_renorm_act_cpu.cpp): renorm_forward / renorm_backward take element hooks (see
// batch_renorm_chunks.h) so that both run the same tasks, chunk sums and merge order.
//
// Tasks: chunks of at most kTaskElements values of one (n, c) plane (contiguous) or blocks of
// rows (channels-last), each writing its own partial; partials merge per channel in a fixed
// order, so neither the thread count nor the schedule changes a bit.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../api_common.h"
#include "batch_renorm_chunks.h"
#include "cpu_kernels.h"

namespace speckle::cpu::CPU_CAPABILITY {  // one copy per variant (csrc/variants/)

constexpr int64_t kTaskElements = 16384;
constexpr int64_t kMinParallelElements = 32768;

inline int64_t grain_for(int64_t elements_per_task) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(elements_per_task, 1));
}

// Whether contiguous passes run one channel per task (batch_renorm_cpu.cpp).
bool per_channel_schedule(const ChannelLayout& lay, bool saves_work);

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

// Per channel (a, b): forward (dy null) (mean, M2) of u, backward (S(g), S(g*u)).
template <typename T, typename H>
void channel_sums(const ChannelLayout& lay, const T* x, const T* dy, const ChannelCoefs& k,
                  double* sum_a, double* sum_b, const H& hooks) {
  const int64_t C = lay.C;
  const bool bwd = dy != nullptr;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    const int64_t L = lay.L, nchunks = tasks.nchunks;
    std::vector<Partial> partial(tasks.count);
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      auto h = hooks.local();
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, L, plane, start, len);
        const int64_t off = plane * L + start;
        if constexpr (H::kActive) if (bwd) h.chunk(plane % C, off, len);
        partial[t] = chunk_partial(x + off, bwd ? dy + off : nullptr, len, plane % C, k, h);
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
    auto h = hooks.local();
    for (int64_t t = begin; t < end; ++t) {
      channels_last_task(x, dy, C, t * rows, std::min(R, (t + 1) * rows), k, scratch.data(),
                         partial.data() + C * t, h);
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

// The affine pass (chunk_affine / channels_last_affine) over all of x (dy optional).
template <typename T, typename H>
void channel_affine(const ChannelLayout& lay, const T* x, const T* dy, T* out, const ChannelCoefs& k,
                    const H& hooks) {
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
        chunk_affine(x + base, dy ? dy + base : nullptr, out + base, len, plane % C, k, h);
      }
    });
    return;
  }
  const int64_t R = lay.N * lay.L, rows = tasks.per_task;
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    auto h = hooks.local();
    for (int64_t t = begin; t < end; ++t) {
      channels_last_affine(x, dy, out, C, t * rows, std::min(R, (t + 1) * rows), k, h);
    }
  });
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
template <typename T, typename H, typename Finalize>
void per_channel_passes(const ChannelLayout& lay, const T* x, const T* dy, T* out,
                        const ChannelCoefs& sum_coefs, const ChannelCoefs& affine_coefs,
                        const Finalize& finalize, const H& hooks) {
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
    auto h = hooks.local();
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
        if constexpr (H::kActive) if (dy) h.chunk(c, off, len, k);
        partial[k] = chunk_partial(x + off, dy ? dy + off : nullptr, len, c, sum_coefs, h);
      });
      const Partial m = merge_channel(partial.data(), lay.N, nchunks, nchunks, dy != nullptr,
                                      [&](int64_t, int64_t j) { return tasks.chunk_len(j, L); });
      finalize(c, m.a, m.b);
      for_each_chunk(c, [&](int64_t k, int64_t off, int64_t len) {
        if constexpr (H::kActive) h.chunk(c, off, len, k);
        chunk_affine(x + off, dy ? dy + off : nullptr, out + off, len, c, affine_coefs, h);
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
    const ChannelCoefs sum_coefs{pivot.data(), nullptr, nullptr, nullptr, nullptr};
    const ChannelCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, st + kScale * C, nullptr,
                                    st + kShift * C};
    const scalar_t* no_dy = nullptr;
    scalar_t* out = stats_only ? nullptr : y.mutable_data_ptr<scalar_t>();
    if (training && !stats_only && per_channel_schedule(lay, hooks.per_channel_saves_work())) {
      per_channel_passes(lay, x, no_dy, out, sum_coefs, affine_coefs, finalize, hooks);
      return;
    }
    std::vector<double> mean_u(C, 0.0), m2(C, 0.0);
    if (training) channel_sums(lay, x, no_dy, sum_coefs, mean_u.data(), m2.data(), hooks);
    for (int64_t c = 0; c < C; ++c) finalize(c, mean_u[c], m2[c]);
    if (!stats_only) channel_affine(lay, x, no_dy, out, affine_coefs, hooks);
  });
  if (training) {
    running_mean.copy_(new_rm);
    running_std.copy_(new_rs);
    num_batches_tracked.add_(1);
  }
  return {y, stats};
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
    auto finalize = [&](int64_t c, double sum_dy, double sum_dyz) {
      finalize_backward_channel(sum_dy, sum_dyz, count, st + c,
                                w.defined() ? w.const_data_ptr<float>()[c] : 1.0f, training, g + c, C);
    };
    const ChannelCoefs sum_coefs{st + kPivot * C, st + kMeanOffset * C, nullptr, nullptr, nullptr};
    const ChannelCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, g + kGradB * C,
                                    g + kGradA * C, g + kGradMeanDy * C};
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    if (per_channel_schedule(lay, hooks.per_channel_saves_work())) {
      per_channel_passes(lay, x, d, out, sum_coefs, affine_coefs, finalize, hooks);
      return;
    }
    std::vector<double> sum_dy(C), sum_dyz(C);
    channel_sums(lay, x, d, sum_coefs, sum_dy.data(), sum_dyz.data(), hooks);
    for (int64_t c = 0; c < C; ++c) finalize(c, sum_dy[c], sum_dyz[c]);
    channel_affine(lay, x, d, out, affine_coefs, hooks);
  });
  return {dx, grads[kGradWeight].clone(), grads[kGradBias].clone()};  // outputs must not alias
}

}  // namespace speckle::cpu::CPU_CAPABILITY
