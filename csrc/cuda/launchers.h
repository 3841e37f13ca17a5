// Host API of the CUDA kernels: plain pointers and sizes, no ATen, so the .cu files compile with
// nvcc against the CUDA toolkit alone (CI checks them on CPU-only machines); cuda_binding.cpp
// turns tensors into these calls. Every launcher enqueues on `stream` and never synchronizes.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../include/batch_renorm_math.h"
#include "../include/norm_block_math.h"
#include "../include/philox.h"

namespace speckle::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kUInt8 };

// x as planes: contiguous -> N*C planes of L values (channel stride L); channels_last -> N*L
// rows of C values (channel stride 1).
struct Layout {
  bool channels_last;
  int64_t N, C, L;
};

// The (kPartialRows, P, C) fp64 workspace of the reductions: forward (count, mean, M2) rows,
// backward the first two rows (S(dy), S(dy*z)). batch_renorm_partials gives P.
constexpr int kPartialRows = 3;
int batch_renorm_partials(const Layout& lay, int multiprocessors);

// y = batch_renorm(x); stats: (kStatRows, C) fp32 out; weight/bias may be null; running stats
// fp32 (C,), updated with num_batches_tracked when training; partial: the workspace above.
void batch_renorm_forward(DType dtype, const void* x, void* y, const Layout& lay, const float* weight,
                          const float* bias, float* running_mean, float* running_std,
                          int64_t* num_batches_tracked, float* stats, double* partial, int P,
                          bool training, float momentum, float eps, Schedule r_max, Schedule d_max,
                          cudaStream_t stream);

// The statistics pass and finalize of batch_renorm_forward alone (same stats, same buffer update).
void batch_renorm_stats(DType dtype, const void* x, const Layout& lay, const float* weight, const float* bias,
                        float* running_mean, float* running_std, int64_t* num_batches_tracked, float* stats,
                        double* partial, int P, bool training, float momentum, float eps, Schedule r_max,
                        Schedule d_max, cudaStream_t stream);

// grads (kGradRows, C) from the backward partials S(dy), S(dy*u) (rows 0, 1 of `partial`).
void batch_renorm_backward_finalize(const double* partial, int P, const Layout& lay, const float* weight,
                                    const float* stats, float* grads, bool training, cudaStream_t stream);

// dx from dy (same layout as x); grads: (kGradRows, C) fp32 out (rows kGradWeight, kGradBias).
void batch_renorm_backward(DType dtype, const void* x, const void* dy, void* dx, const Layout& lay,
                           const float* weight, const float* stats, float* grads, double* partial,
                           int P, bool training, cudaStream_t stream);

// The norm block (include/norm_block_math.h) after batch_renorm_stats: y = dropout(act(z)).
// rng: device int64 (seed, offset), read by the kernels; dropout.active off: no mask.
void batch_renorm_act_forward(DType dtype, const void* x, void* y, const Layout& lay, const float* stats,
                              const int64_t* rng, float slope, const DropoutParams& dropout, cudaStream_t stream);

// dx and grads (kGradRows, C) of the block; the mask and z are regenerated from x and rng.
// partial: (2, P, C) fp64 workspace (P from batch_renorm_partials).
void batch_renorm_act_backward(DType dtype, const void* x, const void* dy, void* dx, const Layout& lay,
                               const float* weight, const float* stats, float* grads, double* partial, int P,
                               bool training, const int64_t* rng, float slope, const DropoutParams& dropout,
                               cudaStream_t stream);

// out = speckle(src) for `numel` contiguous elements, `per_image` of them per image. src is
// float-typed (in_dtype == out_dtype) or kUInt8; with kUInt8, out and clean get 2y-1 and 2v-1.
void speckle_noise(DType in_dtype, DType out_dtype, const void* src, void* out, void* clean,
                   int64_t numel, int64_t per_image, const SpeckleParams& params, cudaStream_t stream);

}  // namespace speckle::cuda
