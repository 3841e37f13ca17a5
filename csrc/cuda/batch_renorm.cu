// BatchRenorm forward/backward CUDA kernels (launched by launchers.h's API): the plan of the Triton
// kernels (speckle_kernels/batch_renorm_triton_kernels.py), all on the device (no host sync):
//   1. reductions: each channel's split over P blocks (blockIdx.x) -> (kPartialRows, P, C) fp64
//      partials. One block per channel would leave an H100 idle at C = 64, 524288 values a channel.
//      Forward: (count, mean, M2) of u = x - pivot. Each thread takes the values it loaded in an
//      iteration (kPerThread, or kRowsInFlight rows) as a group: their mean, the squared
//      deviations from it, merged into its running fp32 (count, mean, M2) with Chan's formula;
//      threads merge in double. No cancellation, whatever the distance of the data from the
//      pivot. Backward: fp32 sums of dy and dy*z (z is centred), the block's total in double.
//   2. finalize: one thread a channel merges its P partials in double (Chan's formula forward)
//      and applies the shared per-channel math (include/batch_renorm_math.h): r, d from
//      num_batches_tracked read on the device, running-stat update, folded coefficients; a
//      1-thread kernel then bumps t.
//   3. affine: y = ((x - pivot) - offset)*scale + shift, or dx = ((x - pivot) - offset)*B +
//      (dy - mean_dy)*A (exactly 0 where a channel holds one value).
// Layouts: contiguous (planes of L values, blocks walk tiles of one plane row) and channels-last
// (rows of C values, 32 channels x 8 rows a block so loads coalesce along C). Offsets are 64-bit.
// Memory-level parallelism: every thread issues all its loads of an iteration (kPerThread values,
// or kRowsInFlight rows) before it uses any (one load in flight: half of copy bandwidth, H100).
// Limits: C <= 65535 for contiguous input (channels on gridDim.y); no 128-bit vector loads yet.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace speckle::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int kRowsInFlight = 4;  // channels-last: rows a thread loads before using them
constexpr int64_t kTile = kThreads * kPerThread;  // values of one plane a contiguous tile holds
constexpr int kClChannels = 32, kClRows = 8;      // channels-last block: 32 channels x 8 rows
constexpr int kFinalizeThreads = 128;
constexpr int kMaxPartials = 4096;

// The per-channel values a sums pass centres with: forward pivot = the channel's first element;
// backward (pivot, offset) from the saved stats.
template <typename T, bool BWD>
__device__ __forceinline__ void centre_of(const T* x, const float* stats, int64_t c, int64_t C,
                                          int64_t channel_stride, float& pivot, float& offset) {
  if (BWD) {
    pivot = stats[kPivot * C + c];
    offset = stats[kMeanOffset * C + c];
  } else {
    pivot = to_float(x[c * channel_stride]);
    offset = 0.0f;
  }
}

// Backward: a += dy, b += dy*u with u = (x - pivot) - offset (the finalize divides by sigma).
__device__ __forceinline__ void accumulate_grad(float xv, float dyv, float pivot, float offset,
                                                float& a, float& b) {
  a += dyv;
  b += dyv * ((xv - pivot) - offset);
}

// A thread's running (count, mean, M2) in fp32.
struct ThreadMoments {
  float count = 0.0f, mean = 0.0f, m2 = 0.0f;
};

// Merges the k values u[j] with keep[j] (k = their number) into t: their own mean and squared
// deviations from it, then Chan's update.
template <int K>
__device__ __forceinline__ void add_group(ThreadMoments& t, const float (&u)[K], const bool (&keep)[K]) {
  float k = 0.0f, s = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    k += keep[j] ? 1.0f : 0.0f;
    s += keep[j] ? u[j] : 0.0f;
  }
  if (k == 0.0f) return;
  const float m = s / k;
  float m2 = 0.0f;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float v = keep[j] ? u[j] - m : 0.0f;
    m2 += v * v;
  }
  const float total = t.count + k, delta = m - t.mean, w = k / total;
  t.mean += delta * w;
  t.m2 += m2 + delta * delta * (t.count * w);
  t.count = total;
}

// Chan's merge of the block's threads (blockDim.x * blockDim.y, a multiple of 32, <= 1024) in
// double; the result is valid in thread 0.
__device__ __forceinline__ Moments block_moments(const ThreadMoments& t, double* shared /* >= 96 */) {
  Moments m{t.count, t.mean, t.m2};
  for (int o = 16; o > 0; o >>= 1) {
    const double n = __shfl_down_sync(0xffffffffu, m.count, o);
    const double mean = __shfl_down_sync(0xffffffffu, m.mean, o);
    const double m2 = __shfl_down_sync(0xffffffffu, m.m2, o);
    merge_moments(m, n, mean, m2);
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, warps = blockDim.x * blockDim.y / 32;
  __syncthreads();
  if (tid % 32 == 0) {
    shared[tid / 32] = m.count;
    shared[32 + tid / 32] = m.mean;
    shared[64 + tid / 32] = m.m2;
  }
  __syncthreads();
  m = tid < warps ? Moments{shared[tid], shared[32 + tid], shared[64 + tid]} : Moments{0.0, 0.0, 0.0};
  if (tid < 32) {
    for (int o = 16; o > 0; o >>= 1) {
      const double n = __shfl_down_sync(0xffffffffu, m.count, o);
      const double mean = __shfl_down_sync(0xffffffffu, m.mean, o);
      const double m2 = __shfl_down_sync(0xffffffffu, m.m2, o);
      merge_moments(m, n, mean, m2);
    }
  }
  return m;
}

// grid (P, C), block kThreads.  x, dy: (N, C, L) contiguous; partial: (kPartialRows, P, C),
// forward rows (count, mean, M2) of u, backward rows (S(dy), S(dy*z)).
template <typename T, bool BWD>
__global__ void sums_contiguous_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                       const float* __restrict__ stats, double* __restrict__ partial,
                                       int64_t N, int64_t C, int64_t L, int64_t tiles_per_row) {
  const int64_t c = blockIdx.y;
  const int p = blockIdx.x, P = gridDim.x;
  float pivot, offset, a = 0.0f, b = 0.0f;
  ThreadMoments tm;
  centre_of<T, BWD>(x, stats, c, C, L, pivot, offset);
  for (int64_t t = p; t < N * tiles_per_row; t += P) {
    const int64_t n = t / tiles_per_row, l0 = (t - n * tiles_per_row) * kTile;
    const int64_t base = (n * C + c) * L;
    float xv[kPerThread], dyv[kPerThread];
    bool keep[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t l = l0 + j * kThreads + threadIdx.x;
      keep[j] = l < L;
      xv[j] = keep[j] ? to_float(x[base + l]) : pivot;  // off the end: dy = 0 adds nothing
      dyv[j] = BWD && keep[j] ? to_float(dy[base + l]) : 0.0f;
    }
    if constexpr (BWD) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) accumulate_grad(xv[j], dyv[j], pivot, offset, a, b);
    } else {
      float u[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) u[j] = xv[j] - pivot;
      add_group(tm, u, keep);
    }
  }
  if constexpr (BWD) {
    __shared__ float shared[32];
    a = block_sum(a, shared);
    b = block_sum(b, shared);
    if (threadIdx.x == 0) {
      partial[p * C + c] = a;
      partial[(P + p) * C + c] = b;
    }
  } else {
    __shared__ double shared[96];
    const Moments m = block_moments(tm, shared);
    if (threadIdx.x == 0) {
      partial[p * C + c] = m.count;
      partial[(P + p) * C + c] = m.mean;
      partial[(2 * P + p) * C + c] = m.m2;
    }
  }
}

// grid (P, ceil(C/32)), block (32, 8).  x, dy: (R, C) rows; partial: as sums_contiguous_kernel.
template <typename T, bool BWD>
__global__ void sums_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                          const float* __restrict__ stats, double* __restrict__ partial,
                                          int64_t R, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kClChannels + threadIdx.x;
  const int p = blockIdx.x, P = gridDim.x;
  float a = 0.0f, b = 0.0f;
  ThreadMoments tm;
  if (c < C) {
    float pivot, offset;
    centre_of<T, BWD>(x, stats, c, C, 1, pivot, offset);
    const int64_t step = static_cast<int64_t>(P) * kClRows;
    int64_t r = static_cast<int64_t>(p) * kClRows + threadIdx.y;
    for (; r + (kRowsInFlight - 1) * step < R; r += kRowsInFlight * step) {
      float xv[kRowsInFlight], dyv[kRowsInFlight];
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {
        xv[j] = to_float(x[(r + j * step) * C + c]);
        dyv[j] = BWD ? to_float(dy[(r + j * step) * C + c]) : 0.0f;
      }
      if constexpr (BWD) {
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) accumulate_grad(xv[j], dyv[j], pivot, offset, a, b);
      } else {
        float u[kRowsInFlight];
        bool keep[kRowsInFlight];
#pragma unroll
        for (int j = 0; j < kRowsInFlight; ++j) {
          u[j] = xv[j] - pivot;
          keep[j] = true;
        }
        add_group(tm, u, keep);
      }
    }
    for (; r < R; r += step) {
      const int64_t i = r * C + c;
      if constexpr (BWD) {
        accumulate_grad(to_float(x[i]), to_float(dy[i]), pivot, offset, a, b);
      } else {
        const float u[1] = {to_float(x[i]) - pivot};
        const bool keep[1] = {true};
        add_group(tm, u, keep);
      }
    }
  }
  if constexpr (BWD) {
    __shared__ float sa[kClRows][kClChannels + 1], sb[kClRows][kClChannels + 1];
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      for (int k = 1; k < kClRows; ++k) {
        a += sa[k][threadIdx.x];
        b += sb[k][threadIdx.x];
      }
      partial[p * C + c] = a;
      partial[(P + p) * C + c] = b;
    }
  } else {
    __shared__ float sn[kClRows][kClChannels + 1], sm[kClRows][kClChannels + 1],
        sq[kClRows][kClChannels + 1];
    sn[threadIdx.y][threadIdx.x] = tm.count;
    sm[threadIdx.y][threadIdx.x] = tm.mean;
    sq[threadIdx.y][threadIdx.x] = tm.m2;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      Moments m{tm.count, tm.mean, tm.m2};
      for (int k = 1; k < kClRows; ++k) merge_moments(m, sn[k][threadIdx.x], sm[k][threadIdx.x], sq[k][threadIdx.x]);
      partial[p * C + c] = m.count;
      partial[(P + p) * C + c] = m.mean;
      partial[(2 * P + p) * C + c] = m.m2;
    }
  }
}

// One thread a channel.  stats: (kStatRows, C) out.
template <typename T>
__global__ void forward_finalize_kernel(const T* __restrict__ x, int64_t channel_stride,
                                        const double* __restrict__ partial, int P, int64_t C, double count,
                                        const float* __restrict__ weight, const float* __restrict__ bias,
                                        float* running_mean, float* running_std,
                                        const int64_t* __restrict__ num_batches_tracked, float* stats,
                                        bool training, float momentum, float eps, Schedule r_max,
                                        Schedule d_max) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Moments m{0.0, 0.0, 0.0};
  if (training) {
    for (int p = 0; p < P; ++p) {
      merge_moments(m, partial[p * C + c], partial[(P + p) * C + c], partial[(2 * P + p) * C + c]);
    }
  }
  const ForwardChannelIn in{m.mean, m.m2, count, training ? to_float(x[c * channel_stride]) : 0.0f,
                            running_mean[c], running_std[c], weight ? weight[c] : 1.0f,
                            bias ? bias[c] : 0.0f};
  float new_mean, new_std;
  finalize_forward_channel(in, training, eps, momentum, static_cast<float>(*num_batches_tracked),
                           r_max, d_max, stats + c, C, &new_mean, &new_std);
  if (training) {
    running_mean[c] = new_mean;
    running_std[c] = new_std;
  }
}

// After the finalize kernel (stream order), so all its threads saw the same t.
__global__ void increment_kernel(int64_t* counter) { *counter += 1; }

__global__ void backward_finalize_kernel(const double* __restrict__ partial, int P, int64_t C, double count,
                                         const float* __restrict__ weight, const float* __restrict__ stats,
                                         float* __restrict__ grads, bool training) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sum_dy = 0.0, sum_dyz = 0.0;
  for (int p = 0; p < P; ++p) {
    sum_dy += partial[p * C + c];
    sum_dyz += partial[(P + p) * C + c];
  }
  finalize_backward_channel(sum_dy, sum_dyz, count, stats + c, weight ? weight[c] : 1.0f, training,
                            grads + c, C);
}

// Per-channel coefficient rows of the affine pass.
struct AffineCoefs {
  const float* pivot;
  const float* offset;
  const float* coef_x;   // scale (forward) / B (backward)
  const float* coef_dy;  // A; null without dy
  const float* coef_0;   // shift (forward, added) / mean_dy (backward, subtracted from dy)
};

// forward ((x - pivot) - offset)*cx + c0; backward ((x - pivot) - offset)*cx + (dy - c0)*cdy.
template <typename T, bool HAS_DY>
__device__ __forceinline__ T affine_value(const T* x, const T* dy, int64_t i, float pivot, float offset,
                                          float cx, float cdy, float c0) {
  const float xc = (to_float(x[i]) - pivot) - offset;  // centre first: keeps precision
  return from_float<T>(HAS_DY ? fmaf(xc, cx, (to_float(dy[i]) - c0) * cdy) : fmaf(xc, cx, c0));
}

// grid (blocks along L, planes (grid-strided)), block kThreads.
template <typename T, bool HAS_DY>
__global__ void affine_contiguous_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                         AffineCoefs k, int64_t planes, int64_t C, int64_t L) {
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t c = plane % C, base = plane * L;
    const float pivot = k.pivot[c], offset = k.offset[c], cx = k.coef_x[c], c0 = k.coef_0[c];
    const float cdy = HAS_DY ? k.coef_dy[c] : 0.0f;
    for (int64_t l0 = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x; l0 < L;
         l0 += static_cast<int64_t>(gridDim.x) * kTile) {
      T v[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int64_t l = l0 + j * kThreads;
        if (l < L) v[j] = affine_value<T, HAS_DY>(x, dy, base + l, pivot, offset, cx, cdy, c0);
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int64_t l = l0 + j * kThreads;
        if (l < L) out[base + l] = v[j];
      }
    }
  }
}

// grid (ceil(C/32), row groups (grid-strided)), block (32, 8).
template <typename T, bool HAS_DY>
__global__ void affine_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                            AffineCoefs k, int64_t R, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClChannels + threadIdx.x;
  if (c >= C) return;
  const float pivot = k.pivot[c], offset = k.offset[c], cx = k.coef_x[c], c0 = k.coef_0[c];
  const float cdy = HAS_DY ? k.coef_dy[c] : 0.0f;
  constexpr int64_t kGroup = kClRows * kRowsInFlight;  // rows of a block's iteration
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kGroup + threadIdx.y; r0 < R;
       r0 += static_cast<int64_t>(gridDim.y) * kGroup) {
    T v[kRowsInFlight];
#pragma unroll
    for (int j = 0; j < kRowsInFlight; ++j) {
      const int64_t r = r0 + j * kClRows;
      if (r < R) v[j] = affine_value<T, HAS_DY>(x, dy, r * C + c, pivot, offset, cx, cdy, c0);
    }
#pragma unroll
    for (int j = 0; j < kRowsInFlight; ++j) {
      const int64_t r = r0 + j * kClRows;
      if (r < R) out[r * C + c] = v[j];
    }
  }
}

template <typename T, bool BWD>
void launch_sums(const T* x, const T* dy, const float* stats, double* partial, int P, const Layout& lay,
                 cudaStream_t stream) {
  if (lay.channels_last) {
    const dim3 grid(P, ceil_div(lay.C, kClChannels)), block(kClChannels, kClRows);
    sums_channels_last_kernel<T, BWD><<<grid, block, 0, stream>>>(x, dy, stats, partial, lay.N * lay.L, lay.C);
  } else {
    const dim3 grid(P, static_cast<unsigned>(lay.C));
    sums_contiguous_kernel<T, BWD><<<grid, kThreads, 0, stream>>>(x, dy, stats, partial, lay.N, lay.C, lay.L,
                                                                  ceil_div(lay.L, kTile));
  }
}

template <typename T, bool HAS_DY>
void launch_affine(const T* x, const T* dy, T* out, const AffineCoefs& k, const Layout& lay, cudaStream_t stream) {
  if (lay.channels_last) {
    const int64_t R = lay.N * lay.L;
    const dim3 grid(ceil_div(lay.C, kClChannels), std::min<unsigned>(ceil_div(R, kClRows * kRowsInFlight), 65535u));
    affine_channels_last_kernel<T, HAS_DY><<<grid, dim3(kClChannels, kClRows), 0, stream>>>(x, dy, out, k, R, lay.C);
  } else {
    const int64_t planes = lay.N * lay.C;
    const dim3 grid(std::min<unsigned>(ceil_div(lay.L, kTile), 1024u),
                    static_cast<unsigned>(std::min<int64_t>(planes, 65535)));
    affine_contiguous_kernel<T, HAS_DY><<<grid, kThreads, 0, stream>>>(x, dy, out, k, planes, lay.C, lay.L);
  }
}

}  // namespace

int batch_renorm_partials(const Layout& lay, int multiprocessors) {
  const int64_t channel_blocks = lay.channels_last ? ceil_div(lay.C, kClChannels) : lay.C;
  const int64_t units = lay.channels_last ? ceil_div(lay.N * lay.L, kClRows) : lay.N * ceil_div(lay.L, kTile);
  const int64_t wanted = ceil_div(8 * static_cast<int64_t>(multiprocessors), channel_blocks);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, units, kMaxPartials})));
}

void batch_renorm_stats(DType dtype, const void* x, const Layout& lay, const float* weight, const float* bias,
                        float* running_mean, float* running_std, int64_t* num_batches_tracked, float* stats,
                        double* partial, int P, bool training, float momentum, float eps, Schedule r_max,
                        Schedule d_max, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    if (training) launch_sums<T, false>(xt, nullptr, nullptr, partial, P, lay, stream);
    const double count = static_cast<double>(lay.N) * static_cast<double>(lay.L);
    forward_finalize_kernel<T><<<ceil_div(lay.C, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
        xt, lay.channels_last ? 1 : lay.L, partial, P, lay.C, count, weight, bias, running_mean,
        running_std, num_batches_tracked, stats, training, momentum, eps, r_max, d_max);
    if (training) increment_kernel<<<1, 1, 0, stream>>>(num_batches_tracked);
  });
}

void batch_renorm_backward_finalize(const double* partial, int P, const Layout& lay, const float* weight,
                                    const float* stats, float* grads, bool training, cudaStream_t stream) {
  const double count = static_cast<double>(lay.N) * static_cast<double>(lay.L);
  backward_finalize_kernel<<<ceil_div(lay.C, kFinalizeThreads), kFinalizeThreads, 0, stream>>>(
      partial, P, lay.C, count, weight, stats, grads, training);
}

void batch_renorm_forward(DType dtype, const void* x, void* y, const Layout& lay, const float* weight,
                          const float* bias, float* running_mean, float* running_std,
                          int64_t* num_batches_tracked, float* stats, double* partial, int P,
                          bool training, float momentum, float eps, Schedule r_max, Schedule d_max,
                          cudaStream_t stream) {
  batch_renorm_stats(dtype, x, lay, weight, bias, running_mean, running_std, num_batches_tracked, stats, partial,
                     P, training, momentum, eps, r_max, d_max, stream);
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const int64_t C = lay.C;
    const AffineCoefs k{stats + kPivot * C, stats + kMeanOffset * C, stats + kScale * C, nullptr, stats + kShift * C};
    launch_affine<T, false>(xt, nullptr, static_cast<T*>(y), k, lay, stream);
  });
}

void batch_renorm_backward(DType dtype, const void* x, const void* dy, void* dx, const Layout& lay,
                           const float* weight, const float* stats, float* grads, double* partial,
                           int P, bool training, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    launch_sums<T, true>(xt, dyt, stats, partial, P, lay, stream);
    batch_renorm_backward_finalize(partial, P, lay, weight, stats, grads, training, stream);
    const int64_t C = lay.C;
    const AffineCoefs k{stats + kPivot * C, stats + kMeanOffset * C, grads + kGradB * C, grads + kGradA * C,
                        grads + kGradMeanDy * C};
    launch_affine<T, true>(xt, dyt, static_cast<T*>(dx), k, lay, stream);
  });
}

}  // namespace speckle::cuda
