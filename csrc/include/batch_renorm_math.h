// Per-channel BatchRenorm math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// The element passes of both backends only reduce sums and apply per-channel coefficients;
// everything between (statistics -> r, d, running-stat update, folded affine; gradient sums ->
// dweight, dbias and the dx coefficients) is here, once. Same equations as the header of
// speckle_kernels/batch_renorm.py, whose Triton kernels use the same row layout:
//
//   forward   u = x - pivot (pivot: the channel's first element), n values per channel
//             mean = pivot + S(u)/n,  sigma = sqrt(max(S(u^2)/n - (S(u)/n)^2, 0)) + eps
//             r = clamp(sigma/rs, 1/r_max(t), r_max(t)), d = clamp((mean-rm)/rs, -d_max(t), d_max(t))
//             y = ((x - pivot) - offset) * scale + shift,  scale = w*r/sigma, shift = w*d + b
//             rm += m*(mean-rm), rs += m*(sigma-rs)
//   eval      pivot = rm, offset = 0, scale = w/rs, shift = b
//   backward  z = ((x - pivot) - offset) * invstd
//             dx = A*dy + B*((x - pivot) - offset) + C0 with A = w*r*invstd,
//             B = -A*S(dy*z)/(n*s) (s = sigma - eps; 0 where the variance is 0), C0 = -A*S(dy)/n
//             dweight = r*S(dy*z) + d*S(dy),  dbias = S(dy)
//
// The sums arrive in double (CPU and CUDA merge fp32 partials in double), so the shifted
// variance loses nothing even for 1e4 + 1e-2*randn data.
#pragma once

#include <math.h>

#include "hd.h"

namespace speckle {

// Rows of the (kStatRows, C) fp32 tensor the forward saves for the backward.
enum StatRow { kPivot = 0, kMeanOffset, kInvstd, kR, kD, kInvS, kScale, kShift, kStatRows };
// Rows of the (kGradRows, C) fp32 per-channel backward results.
enum GradRow { kGradWeight = 0, kGradBias, kGradA, kGradB, kGradC0, kGradRows };

// clamp(slope*t + start, low, high): the r_max / d_max schedules of reference.RenormSchedule.
struct Schedule {
  float slope, start, low, high;
};

SPECKLE_HD float clamp_f(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

SPECKLE_HD float schedule_at(const Schedule& s, float t) {
  return clamp_f(s.slope * t + s.start, s.low, s.high);
}

// Inputs of one channel's forward finalize.
struct ForwardChannelIn {
  double sum_u, sum_u2, count;  // training only: sums of u = x - pivot
  float pivot;                  // training only
  float running_mean, running_std, weight, bias;  // weight 1 / bias 0 when absent
};

// Writes the kStatRows values of one channel to stats[row * stride] and, when training, the
// updated running statistics.
SPECKLE_HD void finalize_forward_channel(const ForwardChannelIn& in, bool training, float eps,
                                         float momentum, float t, const Schedule& r_sched,
                                         const Schedule& d_sched, float* stats, long long stride,
                                         float* new_running_mean, float* new_running_std) {
  const float rm = in.running_mean, rs = in.running_std;
  float pivot, offset, invstd, r, d, inv_s;
  if (training) {
    const double mean_u = in.sum_u / in.count;
    const double var = fmax(in.sum_u2 / in.count - mean_u * mean_u, 0.0);
    const float std_biased = static_cast<float>(sqrt(var));
    const float sigma = std_biased + eps;
    const float mean = in.pivot + static_cast<float>(mean_u);
    const float r_max = schedule_at(r_sched, t), d_max = schedule_at(d_sched, t);
    pivot = in.pivot;
    offset = static_cast<float>(mean_u);
    invstd = 1.0f / sigma;
    r = clamp_f(sigma / rs, 1.0f / r_max, r_max);
    d = clamp_f((mean - rm) / rs, -d_max, d_max);
    inv_s = std_biased > 0.0f ? 1.0f / std_biased : 0.0f;  // d sqrt(var) taken as 0 at var = 0
    *new_running_mean = rm + momentum * (mean - rm);
    *new_running_std = rs + momentum * (sigma - rs);
  } else {
    pivot = rm;
    offset = 0.0f;
    invstd = 1.0f / rs;
    r = 1.0f;
    d = 0.0f;
    inv_s = 0.0f;
  }
  stats[kPivot * stride] = pivot;
  stats[kMeanOffset * stride] = offset;
  stats[kInvstd * stride] = invstd;
  stats[kR * stride] = r;
  stats[kD * stride] = d;
  stats[kInvS * stride] = inv_s;
  stats[kScale * stride] = in.weight * r * invstd;
  stats[kShift * stride] = in.weight * d + in.bias;
}

// From one channel's S(dy), S(dy*z) and its saved stats (read with `stride`), writes the
// kGradRows values to grads[row * stride].
SPECKLE_HD void finalize_backward_channel(double sum_dy, double sum_dyz, double count,
                                          const float* stats, float weight, bool training,
                                          float* grads, long long stride) {
  const float r = stats[kR * stride], d = stats[kD * stride];
  const float coef_a = weight * r * stats[kInvstd * stride];
  grads[kGradWeight * stride] = static_cast<float>(r * sum_dyz + d * sum_dy);
  grads[kGradBias * stride] = static_cast<float>(sum_dy);
  grads[kGradA * stride] = coef_a;
  grads[kGradB * stride] =
      training ? static_cast<float>(-coef_a * sum_dyz * stats[kInvS * stride] / count) : 0.0f;
  grads[kGradC0 * stride] = training ? static_cast<float>(-coef_a * sum_dy / count) : 0.0f;
}

}  // namespace speckle
