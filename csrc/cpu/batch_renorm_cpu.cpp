// BatchRenorm forward/backward on the CPU: ATen vector types (vec_helpers.h) under at::parallel_for.
//
// Two element passes each way, as on the GPU (see csrc/include/batch_renorm_math.h for the
// per-channel math between them):
//   forward   sums of u = x - pivot and u^2         -> finalize -> y = (u - offset)*scale + shift
//   backward  sums of dy and dy*z, z = (u-offset)*invstd -> finalize -> dx = (u-offset)*B + dy*A + C0
// Work is split into tasks of ~kTaskElements values (a chunk of one (n, c) plane for contiguous
// input, a block of rows for channels-last), each writing its own fp32 partial sums; partials
// are merged per channel in double in a fixed order, so results do not depend on the thread
// count. fp16/bf16 are widened to fp32 on load and rounded once on store.
//
// Two schedules run those passes over contiguous input, with the same chunks, the same fp32
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
    len = std::min(per_task, L - start);
  }
};

// Per-channel inputs of the element passes (fp32, length C).
struct ChannelCoefs {
  const float* pivot;
  const float* offset;
  const float* coef_x;  // invstd in the backward sums; scale / B in the affine passes
  const float* coef_dy;
  const float* coef_0;
};

// Sums of one chunk of a contiguous plane of channel c (len values at xp, and dp when backward):
// forward (dp null) u and u^2, backward dy and dy*z. Returned as fp32 (a, b).
template <typename T>
inline std::pair<float, float> chunk_sums(const T* xp, const T* dp, int64_t len, int64_t c,
                                          const ChannelCoefs& k) {
  const bool bwd = dp != nullptr;
  const fVec p(k.pivot[c]), o(bwd ? k.offset[c] : 0.0f), s(bwd ? k.coef_x[c] : 1.0f);
  fVec a0(0.0f), a1(0.0f), b0(0.0f), b1(0.0f);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1;
    load2(xp + i, x0, x1, n);
    fVec u0 = x0 - p, u1 = x1 - p;
    if (bwd) {
      fVec d0, d1;
      load2(dp + i, d0, d1, n);  // zero past n, so the tail adds nothing
      a0 += d0;
      a1 += d1;
      b0 = at::vec::fmadd(d0, (u0 - o) * s, b0);
      b1 = at::vec::fmadd(d1, (u1 - o) * s, b1);
    } else {
      if (n < kW) keep_first(u0, u1, n);
      a0 += u0;
      a1 += u1;
      b0 = at::vec::fmadd(u0, u0, b0);
      b1 = at::vec::fmadd(u1, u1, b1);
    }
  }
  return {hsum(a0 + a1), hsum(b0 + b1)};
}

// out = ((x - pivot) - offset) * coef_x + dy * coef_dy + coef_0 over one chunk of a contiguous
// plane of channel c (dy optional).
template <typename T>
inline void chunk_affine(const T* xp, const T* dp, T* op, int64_t len, int64_t c,
                         const ChannelCoefs& k) {
  const fVec p(k.pivot[c]), o(k.offset[c]), cx(k.coef_x[c]), c0(k.coef_0[c]);
  const fVec cdy(dp ? k.coef_dy[c] : 0.0f);
  for (int64_t i = 0; i < len; i += kW) {
    const int64_t n = std::min(kW, len - i);
    fVec x0, x1;
    load2(xp + i, x0, x1, n);
    fVec y0 = at::vec::fmadd((x0 - p) - o, cx, c0), y1 = at::vec::fmadd((x1 - p) - o, cx, c0);
    if (dp) {
      fVec d0, d1;
      load2(dp + i, d0, d1, n);
      y0 = at::vec::fmadd(d0, cdy, y0);
      y1 = at::vec::fmadd(d1, cdy, y1);
    }
    store2(op + i, y0, y1, n);
  }
}

// One channel's fp32 partials merged in double, n-major then chunk: N planes `plane_stride`
// floats apart, each with nchunks (a, b) pairs. Both schedules merge in this order.
inline void merge_channel(const float* first, int64_t N, int64_t plane_stride, int64_t nchunks,
                          double& sa, double& sb) {
  sa = 0.0;
  sb = 0.0;
  for (int64_t nn = 0; nn < N; ++nn) {
    const float* q = first + nn * plane_stride;
    for (int64_t j = 0; j < nchunks; ++j) {
      sa += q[2 * j];
      sb += q[2 * j + 1];
    }
  }
}

// S_a, S_b per channel: forward (no dy) sums u and u^2, backward sums dy and dy*z.
template <typename T>
void channel_sums(const ChannelLayout& lay, const T* x, const T* dy, const ChannelCoefs& k,
                  double* sum_a, double* sum_b) {
  const int64_t C = lay.C;
  const bool bwd = dy != nullptr;
  const Tasks tasks(lay);
  if (!lay.channels_last) {
    const int64_t L = lay.L, nchunks = tasks.nchunks;
    std::vector<float> partial(2 * tasks.count);
    at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int64_t plane, start, len;
        tasks.chunk(t, L, plane, start, len);
        const auto [a, b] = chunk_sums(x + plane * L + start, bwd ? dy + plane * L + start : nullptr,
                                       len, plane % C, k);
        partial[2 * t] = a;
        partial[2 * t + 1] = b;
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        merge_channel(partial.data() + 2 * c * nchunks, lay.N, 2 * C * nchunks, nchunks, sum_a[c],
                      sum_b[c]);
      }
    });
    return;
  }
  // channels-last: rows of C values; each task owns a block of rows and 2*C partials.
  const int64_t R = lay.N * lay.L, rows = tasks.per_task;
  std::vector<float> partial(2 * C * tasks.count, 0.0f);
  at::parallel_for(0, tasks.count, grain_for(tasks.elements), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* acc_a = partial.data() + 2 * C * t;
      float* acc_b = acc_a + C;
      const int64_t r_end = std::min(R, (t + 1) * rows);
      for (int64_t r = t * rows; r < r_end; ++r) {
        const T* xr = x + r * C;
        const T* dr = bwd ? dy + r * C : nullptr;
        for (int64_t c = 0; c < C; c += kW) {
          const int64_t n = std::min(kW, C - c);
          fVec x0, x1, p0, p1, sa0, sa1, sb0, sb1;
          load2(xr + c, x0, x1, n);
          load2(k.pivot + c, p0, p1, n);
          load2(acc_a + c, sa0, sa1, n);
          load2(acc_b + c, sb0, sb1, n);
          fVec u0 = x0 - p0, u1 = x1 - p1;
          if (bwd) {
            fVec o0, o1, s0, s1, d0, d1;
            load2(k.offset + c, o0, o1, n);
            load2(k.coef_x + c, s0, s1, n);
            load2(dr + c, d0, d1, n);
            sa0 += d0;
            sa1 += d1;
            sb0 = at::vec::fmadd(d0, (u0 - o0) * s0, sb0);
            sb1 = at::vec::fmadd(d1, (u1 - o1) * s1, sb1);
          } else {
            sa0 += u0;
            sa1 += u1;
            sb0 = at::vec::fmadd(u0, u0, sb0);
            sb1 = at::vec::fmadd(u1, u1, sb1);
          }
          store2(acc_a + c, sa0, sa1, n);  // lanes past n are never stored
          store2(acc_b + c, sb0, sb1, n);
        }
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sa = 0.0, sb = 0.0;
      for (int64_t t = 0; t < tasks.count; ++t) {
        sa += partial[2 * C * t + c];
        sb += partial[2 * C * t + C + c];
      }
      sum_a[c] = sa;
      sum_b[c] = sb;
    }
  });
}

// out = ((x - pivot) - offset) * coef_x + dy * coef_dy + coef_0   (dy optional)
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
          fVec x0, x1, p0, p1, o0, o1, cx0, cx1, c00, c01;
          load2(x + off, x0, x1, n);
          load2(k.pivot + c, p0, p1, n);
          load2(k.offset + c, o0, o1, n);
          load2(k.coef_x + c, cx0, cx1, n);
          load2(k.coef_0 + c, c00, c01, n);
          fVec y0 = at::vec::fmadd((x0 - p0) - o0, cx0, c00);
          fVec y1 = at::vec::fmadd((x1 - p1) - o1, cx1, c01);
          if (has_dy) {
            fVec d0, d1, cd0, cd1;
            load2(dy + off, d0, d1, n);
            load2(k.coef_dy + c, cd0, cd1, n);
            y0 = at::vec::fmadd(d0, cd0, y0);
            y1 = at::vec::fmadd(d1, cd1, y1);
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

// The per-channel schedule of contiguous input: for each channel, sums (sum_coefs, as
// channel_sums) -> finalize(c, S_a, S_b), which writes channel c of the arrays affine_coefs
// points to -> affine (as channel_affine). dy: backward, null: forward.
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
    std::vector<float> partial(2 * lay.N * nchunks);
    for (int64_t c = begin; c < end; ++c) {
      for_each_chunk(c, [&](int64_t k, int64_t off, int64_t len) {
        std::tie(partial[2 * k], partial[2 * k + 1]) =
            chunk_sums(x + off, dy ? dy + off : nullptr, len, c, sum_coefs);
      });
      double sa, sb;
      merge_channel(partial.data(), lay.N, 2 * nchunks, nchunks, sa, sb);
      finalize(c, sa, sb);
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
    auto finalize = [&](int64_t c, double sum_u, double sum_u2) {
      const ForwardChannelIn in{sum_u, sum_u2, count, pivot[c], rm.const_data_ptr<float>()[c],
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
    std::vector<double> sum_u(C, 0.0), sum_u2(C, 0.0);
    if (training) channel_sums<scalar_t>(lay, x, nullptr, sum_coefs, sum_u.data(), sum_u2.data());
    for (int64_t c = 0; c < C; ++c) finalize(c, sum_u[c], sum_u2[c]);
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
    const ChannelCoefs sum_coefs{st + kPivot * C, st + kMeanOffset * C, st + kInvstd * C, nullptr, nullptr};
    const ChannelCoefs affine_coefs{st + kPivot * C, st + kMeanOffset * C, g + kGradB * C,
                                    g + kGradA * C, g + kGradC0 * C};
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
