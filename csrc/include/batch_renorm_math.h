// Per-channel BatchRenorm math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// The element passes of both backends only reduce statistics and apply per-channel
// coefficients; everything between (statistics -> r, d, running-stat update, folded affine;
// gradient sums -> dweight, dbias and the dx coefficients) is here, once. Same equations as the
// header of speckle_kernels/batch_renorm.py, whose Triton kernels use the same row layout:
//
//   forward   u = x - pivot (pivot: the channel's first element), n values per channel
//             (mean_u, M2) of u: per tile/chunk the mean and the sum of squared deviations
//             about it (two passes over data still in cache), tiles merged with Chan's formula
//             in double (merge_moments)
//             mean = pivot + mean_u,  sigma = sqrt(M2/n) + eps
//             r = clamp(sigma/rs, 1/r_max(t), r_max(t)), d = clamp((mean-rm)/rs, -d_max(t), d_max(t))
//             y = ((x - pivot) - offset) * scale + shift,  offset = mean_u, scale = w*r/sigma,
//             shift = w*d + b;   rm += m*(mean-rm), rs += m*(sigma-rs)
//   eval      pivot = rm, offset = 0, scale = w/rs, shift = b
//   backward  u = (x - pivot) - offset, z = u / sigma (eval: sigma = rs)
//             the element pass sums S(dy) and S(dy*u); S(dy*z) = S(dy*u)/sigma once, in double
//             (a rounded 1/sigma in every term would bias them all alike: visible in eval,
//             where S(dy*z) does not cancel)
//             dx = A*(dy - mean_dy) + B*((x - pivot) - offset) with A = w*r/sigma,
//             mean_dy = S(dy)/n, B = -A*S(dy*z)/(n*s) (s = sigma - eps; 0 where the variance
//             is 0); eval: mean_dy = B = 0.  dweight = r*S(dy*z) + d*S(dy),  dbias = S(dy)
//
// Why this shape: a one-pass S(u), S(u^2) about the first element loses a factor of about
// 1 + (mean - pivot)^2 / sigma^2 of its precision to cancellation; deviations about each tile's
// own mean do not, and the global pivot still makes u exact for data whose mean dwarfs its
// spread (1e4 + 1e-2*randn). dx subtracts mean_dy from dy before scaling, so where a channel
// holds one value (dy - mean_dy = 0, B = 0) dx is exactly 0, as y = w*d + b does not depend on x.
// Everything here runs in double and is rounded once to the fp32 rows.
#pragma once

#include <math.h>

#include "hd.h"

namespace speckle {

// Rows of the (kStatRows, C) fp32 tensor the forward saves for the backward.
enum StatRow { kPivot = 0, kMeanOffset, kSigma, kR, kD, kInvS, kScale, kShift, kStatRows };
// Rows of the (kGradRows, C) fp32 per-channel backward results.
enum GradRow { kGradWeight = 0, kGradBias, kGradA, kGradB, kGradMeanDy, kGradRows };

// clamp(slope*t + start, low, high): the r_max / d_max schedules of reference.RenormSchedule.
struct Schedule {
  float slope, start, low, high;
};

SPECKLE_HD float clamp_f(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

SPECKLE_HD float schedule_at(const Schedule& s, float t) {
  return clamp_f(s.slope * t + s.start, s.low, s.high);
}

// count values with this mean and sum of squared deviations from it (M2).
struct Moments {
  double count, mean, m2;
};

// Adds (count, mean, m2) of other values to acc (Chan, Golub & LeVeque's pairwise update).
SPECKLE_HD void merge_moments(Moments& acc, double count, double mean, double m2) {
  if (count <= 0.0) return;
  if (acc.count <= 0.0) {  // what the update gives, without its division
    acc = {count, mean, m2};
    return;
  }
  const double total = acc.count + count, delta = mean - acc.mean, w = count / total;
  acc.mean += delta * w;
  acc.m2 += m2 + delta * delta * (acc.count * w);
  acc.count = total;
}

// Inputs of one channel's forward finalize.
struct ForwardChannelIn {
  double mean_u, m2, count;  // training only: Moments of u = x - pivot
  float pivot;               // training only
  float running_mean, running_std, weight, bias;  // weight 1 / bias 0 when absent
};

// Writes the kStatRows values of one channel to stats[row * stride] and, when training, the
// updated running statistics.
SPECKLE_HD void finalize_forward_channel(const ForwardChannelIn& in, bool training, float eps,
                                         float momentum, float t, const Schedule& r_sched,
                                         const Schedule& d_sched, float* stats, long long stride,
                                         float* new_running_mean, float* new_running_std) {
  const double rm = in.running_mean, rs = in.running_std, w = in.weight;
  float pivot, offset, inv_s;
  double sigma, r, d;
  if (training) {
    const double std_biased = sqrt(fmax(in.m2 / in.count, 0.0));
    const double mean = static_cast<double>(in.pivot) + in.mean_u;
    const float r_max = schedule_at(r_sched, t), d_max = schedule_at(d_sched, t);
    sigma = std_biased + eps;
    r = fmin(fmax(sigma / rs, static_cast<double>(1.0f / r_max)), static_cast<double>(r_max));
    d = fmin(fmax((mean - rm) / rs, -static_cast<double>(d_max)), static_cast<double>(d_max));
    pivot = in.pivot;
    offset = static_cast<float>(in.mean_u);
    inv_s = std_biased > 0.0 ? static_cast<float>(1.0 / std_biased) : 0.0f;  // d sqrt(var) := 0 at 0
    *new_running_mean = static_cast<float>(rm + momentum * (mean - rm));
    *new_running_std = static_cast<float>(rs + momentum * (sigma - rs));
  } else {
    sigma = rs;
    r = 1.0;
    d = 0.0;
    pivot = in.running_mean;
    offset = 0.0f;
    inv_s = 0.0f;
  }
  stats[kPivot * stride] = pivot;
  stats[kMeanOffset * stride] = offset;
  stats[kSigma * stride] = static_cast<float>(sigma);
  stats[kR * stride] = static_cast<float>(r);
  stats[kD * stride] = static_cast<float>(d);
  stats[kInvS * stride] = inv_s;
  stats[kScale * stride] = static_cast<float>(w * r / sigma);
  stats[kShift * stride] = static_cast<float>(w * d + in.bias);
}

// From one channel's S(dy), S(dy*u) and its saved stats (read with `stride`), writes the
// kGradRows values to grads[row * stride].
SPECKLE_HD void finalize_backward_channel(double sum_dy, double sum_dyu, double count,
                                          const float* stats, float weight, bool training,
                                          float* grads, long long stride) {
  const double r = stats[kR * stride], d = stats[kD * stride];
  const double sigma = stats[kSigma * stride];
  const double sum_dyz = sum_dyu / sigma;
  const double coef_a = static_cast<double>(weight) * r / sigma;
  grads[kGradWeight * stride] = static_cast<float>(r * sum_dyz + d * sum_dy);
  grads[kGradBias * stride] = static_cast<float>(sum_dy);
  grads[kGradA * stride] = static_cast<float>(coef_a);
  grads[kGradB * stride] =
      training ? static_cast<float>(-coef_a * sum_dyz * stats[kInvS * stride] / count) : 0.0f;
  grads[kGradMeanDy * stride] = training ? static_cast<float>(sum_dy / count) : 0.0f;
}

}  // namespace speckle
