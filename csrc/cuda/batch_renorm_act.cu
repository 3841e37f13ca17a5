// The norm block's CUDA element passes: y = dropout(act(batch_renorm(x))) and its backward, with
// the per-element math and mask stream of include/norm_block_math.h (the same as reference.py's
// norm-block section and the Triton kernel of batch_renorm_act_triton.py).
//
// The statistics, the running-buffer update and both finalizes are batch_renorm.cu's (called
// through launchers.h); what is here are the passes that need the mask:
//   forward  y = keep ? act(z)*keep_scale : 0,  z = ((x - pivot) - offset)*scale + shift
//   sums     per channel S(g), S(g*u), g = act'(z)*(keep ? dy*keep_scale : 0)   -> (2, P, C) fp64
//   dx       dx = u*B + (g - mean_g)*A   (g, z and the mask recomputed: nothing saved but x)
// Why quads: Philox4x32-10 costs ~100 integer operations and gives four words, one per element
// of four consecutive logical indices e = offset + j. A bf16 block moves 4 bytes an element, so
// one Philox call per element would make it compute-bound; here one thread handles one quad:
// four consecutive l of one (n, c) row, whose e are 4q .. 4q+3. A row of L elements starts at
// e = offset + (n*C + c)*L, (that & 3) past a multiple of 4, so each row's quads start that many
// elements before l = 0 and a row has up to one quad more (masked ends). Both layouts walk rows:
// contiguous rows are planes (a thread's four elements adjacent in memory, threads along l),
// channels-last rows are strided by C (threads along c, so a warp reads 32 adjacent channels).
// seed and offset are read from the rng tensor on the device: no host sync, graph capturable.
// Limits: C <= 65535 for contiguous input (channels on gridDim.y), as batch_renorm.cu.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace speckle::cuda {
namespace {

constexpr int kThreads = 256;                 // contiguous: threads of a block along a row
constexpr int kClChannels = 32, kClRows = 8;  // channels-last block: 32 channels x 8 quad rows

// The per-channel values an element pass needs (A, B, mean_g only in the dx pass).
struct ChannelCoefs {
  float pivot, offset, scale, shift, coef_a = 0.0f, coef_b = 0.0f, mean_g = 0.0f;
};

__device__ __forceinline__ ChannelCoefs coefs_of(const float* stats, const float* grads, int64_t c, int64_t C) {
  ChannelCoefs k{stats[kPivot * C + c], stats[kMeanOffset * C + c], stats[kScale * C + c],
                 stats[kShift * C + c]};
  if (grads != nullptr) {
    k.coef_a = grads[kGradA * C + c];
    k.coef_b = grads[kGradB * C + c];
    k.mean_g = grads[kGradMeanDy * C + c];
  }
  return k;
}

// The launch's dropout parameters with seed and offset read from the device rng tensor.
__device__ __forceinline__ DropoutParams with_rng(DropoutParams d, const int64_t* rng) {
  if (d.active) {
    d.seed = static_cast<uint64_t>(rng[0]);
    d.offset = static_cast<uint64_t>(rng[1]);
  }
  return d;
}

// Quads a row holds: one more when dropout shifts the rows.
__host__ __device__ __forceinline__ int64_t quads_per_row(int64_t L, bool active) {
  return (L + (active ? 3 : 0) + 3) / 4;
}

// Quad k of row (n, c): element w of it is l = first + w, at base + l*l_stride in memory, and
// takes word w of Philox counter q.
struct Quad {
  int64_t base, l_stride, first;
  uint64_t q;
};

__device__ __forceinline__ Quad quad_of(const Layout& lay, int64_t n, int64_t c, int64_t k, const DropoutParams& d) {
  const uint64_t row_e = d.offset + static_cast<uint64_t>((n * lay.C + c) * lay.L);
  const int64_t shift = d.active ? static_cast<int64_t>(row_e & 3u) : 0;
  Quad qd;
  qd.base = lay.channels_last ? n * lay.L * lay.C + c : (n * lay.C + c) * lay.L;
  qd.l_stride = lay.channels_last ? lay.C : 1;
  qd.first = 4 * k - shift;
  qd.q = ((row_e - static_cast<uint64_t>(shift)) >> 2) + static_cast<uint64_t>(k);
  return qd;
}

// The quad's u = (x - pivot) - offset and v: forward y, backward g (both 0 off the row). One
// Philox call; all loads issued before any use (memory-level parallelism, as batch_renorm.cu).
template <typename T, bool BWD>
__device__ __forceinline__ void quad_values(const T* x, const T* dy, const Quad& qd, int64_t L, const ChannelCoefs& k,
                                            const DropoutParams& d, float slope, bool (&valid)[4], int64_t (&at)[4],
                                            float (&u)[4], float (&v)[4]) {
  float xv[4], dyv[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int64_t l = qd.first + w;
    valid[w] = l >= 0 && l < L;
    at[w] = qd.base + l * qd.l_stride;
    xv[w] = valid[w] ? to_float(x[at[w]]) : k.pivot;
    dyv[w] = BWD && valid[w] ? to_float(dy[at[w]]) : 0.0f;
  }
  uint32_t words[4] = {0u, 0u, 0u, 0u};
  if (d.active) mask_words(d.seed, qd.q, words);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    u[w] = valid[w] ? (xv[w] - k.pivot) - k.offset : 0.0f;  // centre first: keeps precision
    const float z = fmaf(u[w], k.scale, k.shift);
    const bool keep = !d.active || philox_uniform(words[w]) >= d.p;
    if (BWD) {
      v[w] = activate_backward(z, keep ? (d.active ? dyv[w] * d.keep_scale : dyv[w]) : 0.0f, slope);
    } else {
      const float a = activate(z, slope);
      v[w] = keep ? (d.active ? a * d.keep_scale : a) : 0.0f;
    }
  }
}

// Writes y (forward) or dx = u*B + (g - mean_g)*A (BWD) of one quad.
template <typename T, bool BWD>
__device__ __forceinline__ void apply_quad(const T* x, const T* dy, T* out, const Quad& qd, int64_t L,
                                           const ChannelCoefs& k, const DropoutParams& d, float slope) {
  bool valid[4];
  int64_t at[4];
  float u[4], v[4];
  quad_values<T, BWD>(x, dy, qd, L, k, d, slope, valid, at, u, v);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if (valid[w]) out[at[w]] = from_float<T>(BWD ? fmaf(u[w], k.coef_b, (v[w] - k.mean_g) * k.coef_a) : v[w]);
  }
}

// Contiguous: grid (blocks along a row's quads, planes (grid-strided)), block kThreads.
template <typename T, bool BWD>
__global__ void apply_contiguous_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                        const float* __restrict__ stats, const float* __restrict__ grads,
                                        const int64_t* __restrict__ rng, Layout lay, float slope, DropoutParams drop) {
  const DropoutParams d = with_rng(drop, rng);
  const int64_t quads = quads_per_row(lay.L, d.active);
  for (int64_t plane = blockIdx.y; plane < lay.N * lay.C; plane += gridDim.y) {
    const int64_t n = plane / lay.C, c = plane - n * lay.C;
    const ChannelCoefs k = coefs_of(stats, grads, c, lay.C);
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < quads;
         q += static_cast<int64_t>(gridDim.x) * kThreads) {
      apply_quad<T, BWD>(x, dy, out, quad_of(lay, n, c, q, d), lay.L, k, d, slope);
    }
  }
}

// Channels-last: grid (ceil(C/32), quad rows (grid-strided)), block (32, 8).
template <typename T, bool BWD>
__global__ void apply_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                           const float* __restrict__ stats, const float* __restrict__ grads,
                                           const int64_t* __restrict__ rng, Layout lay, float slope,
                                           DropoutParams drop) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClChannels + threadIdx.x;
  if (c >= lay.C) return;
  const DropoutParams d = with_rng(drop, rng);
  const int64_t quads = quads_per_row(lay.L, d.active);
  const ChannelCoefs k = coefs_of(stats, grads, c, lay.C);
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * kClRows + threadIdx.y; r < lay.N * quads;
       r += static_cast<int64_t>(gridDim.y) * kClRows) {
    const int64_t n = r / quads;
    apply_quad<T, BWD>(x, dy, out, quad_of(lay, n, c, r - n * quads, d), lay.L, k, d, slope);
  }
}

// Adds S(g) and S(g*u) of quad (n, c, q) to a and b.
template <typename T>
__device__ __forceinline__ void add_quad_sums(const T* x, const T* dy, const Layout& lay, int64_t n, int64_t c,
                                              int64_t q, const ChannelCoefs& k, const DropoutParams& d, float slope,
                                              float& a, float& b) {
  bool valid[4];
  int64_t at[4];
  float u[4], g[4];
  quad_values<T, true>(x, dy, quad_of(lay, n, c, q, d), lay.L, k, d, slope, valid, at, u, g);
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    a += g[w];
    b += g[w] * u[w];
  }
}

// Contiguous: grid (P, C), block kThreads; program p of channel c takes every P-th run of
// kThreads quads over the channel's N rows. partial: (2, P, C) fp64.
template <typename T>
__global__ void sums_contiguous_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                       const float* __restrict__ stats, double* __restrict__ partial,
                                       const int64_t* __restrict__ rng, Layout lay, float slope, DropoutParams drop) {
  const int64_t c = blockIdx.y;
  const int p = blockIdx.x, P = gridDim.x;
  const DropoutParams d = with_rng(drop, rng);
  const int64_t quads = quads_per_row(lay.L, d.active);
  const ChannelCoefs k = coefs_of(stats, nullptr, c, lay.C);
  float a = 0.0f, b = 0.0f;
  for (int64_t t = static_cast<int64_t>(p) * kThreads + threadIdx.x; t < lay.N * quads;
       t += static_cast<int64_t>(P) * kThreads) {
    const int64_t n = t / quads;
    add_quad_sums(x, dy, lay, n, c, t - n * quads, k, d, slope, a, b);
  }
  __shared__ float shared[32];
  a = block_sum(a, shared);
  b = block_sum(b, shared);
  if (threadIdx.x == 0) {
    partial[p * lay.C + c] = a;
    partial[(P + p) * lay.C + c] = b;
  }
}

// Channels-last: grid (P, ceil(C/32)), block (32, 8); rows of quads strided by P*8.
template <typename T>
__global__ void sums_channels_last_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                          const float* __restrict__ stats, double* __restrict__ partial,
                                          const int64_t* __restrict__ rng, Layout lay, float slope,
                                          DropoutParams drop) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kClChannels + threadIdx.x;
  const int p = blockIdx.x, P = gridDim.x;
  float a = 0.0f, b = 0.0f;
  if (c < lay.C) {
    const DropoutParams d = with_rng(drop, rng);
    const int64_t quads = quads_per_row(lay.L, d.active);
    const ChannelCoefs k = coefs_of(stats, nullptr, c, lay.C);
    for (int64_t r = static_cast<int64_t>(p) * kClRows + threadIdx.y; r < lay.N * quads;
         r += static_cast<int64_t>(P) * kClRows) {
      const int64_t n = r / quads;
      add_quad_sums(x, dy, lay, n, c, r - n * quads, k, d, slope, a, b);
    }
  }
  // the 8 rows of a channel column, added by its thread of row 0 (fp32, as batch_renorm.cu)
  __shared__ float sa[kClRows][kClChannels + 1], sb[kClRows][kClChannels + 1];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0 || c >= lay.C) return;
  for (int row = 1; row < kClRows; ++row) {
    a += sa[row][threadIdx.x];
    b += sb[row][threadIdx.x];
  }
  partial[p * lay.C + c] = a;
  partial[(P + p) * lay.C + c] = b;
}

template <typename T, bool BWD>
void launch_apply(const T* x, const T* dy, T* out, const float* stats, const float* grads, const int64_t* rng,
                  const Layout& lay, float slope, const DropoutParams& d, cudaStream_t stream) {
  const int64_t quads = quads_per_row(lay.L, d.active);
  if (lay.channels_last) {
    const dim3 grid(ceil_div(lay.C, kClChannels), std::min<unsigned>(ceil_div(lay.N * quads, kClRows), 65535u));
    apply_channels_last_kernel<T, BWD><<<grid, dim3(kClChannels, kClRows), 0, stream>>>(x, dy, out, stats, grads,
                                                                                        rng, lay, slope, d);
  } else {
    const dim3 grid(std::min<unsigned>(ceil_div(quads, kThreads), 1024u),
                    static_cast<unsigned>(std::min<int64_t>(lay.N * lay.C, 65535)));
    apply_contiguous_kernel<T, BWD><<<grid, kThreads, 0, stream>>>(x, dy, out, stats, grads, rng, lay, slope, d);
  }
}

}  // namespace

void batch_renorm_act_forward(DType dtype, const void* x, void* y, const Layout& lay, const float* stats,
                              const int64_t* rng, float slope, const DropoutParams& dropout, cudaStream_t stream) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_apply<T, false>(static_cast<const T*>(x), nullptr, static_cast<T*>(y), stats, nullptr, rng, lay, slope,
                           dropout, stream);
  });
}

void batch_renorm_act_backward(DType dtype, const void* x, const void* dy, void* dx, const Layout& lay,
                               const float* weight, const float* stats, float* grads, double* partial, int P,
                               bool training, const int64_t* rng, float slope, const DropoutParams& dropout,
                               cudaStream_t stream) {
  dispatch_float(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    const T* dyt = static_cast<const T*>(dy);
    if (lay.channels_last) {
      const dim3 grid(P, ceil_div(lay.C, kClChannels));
      sums_channels_last_kernel<T><<<grid, dim3(kClChannels, kClRows), 0, stream>>>(xt, dyt, stats, partial, rng,
                                                                                   lay, slope, dropout);
    } else {
      const dim3 grid(P, static_cast<unsigned>(lay.C));
      sums_contiguous_kernel<T><<<grid, kThreads, 0, stream>>>(xt, dyt, stats, partial, rng, lay, slope, dropout);
    }
    batch_renorm_backward_finalize(partial, P, lay, weight, stats, grads, training, stream);
    launch_apply<T, true>(xt, dyt, static_cast<T*>(dx), stats, grads, rng, lay, slope, dropout, stream);
  });
}

}  // namespace speckle::cuda
