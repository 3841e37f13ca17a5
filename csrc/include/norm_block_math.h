// Per-element math of the norm block (BatchRenorm -> activation -> dropout), shared by the CPU
// and CUDA kernels; the same definitions as speckle_kernels/reference.py's norm-block section.
//
//   z = (u - offset) * scale + shift            (batch_renorm_math.h's affine, fp32)
//   a = act(z): identity z | relu (z > 0 ? z : 0) | leaky_relu (z > 0 ? z : z * slope)
//   y = keep(e) ? a * keep_scale : 0            training and p > 0 only; keep_scale =
//                                               float(1 / (1 - p)), as nn.Dropout
//   backward: g = dy (dropped: 0, kept: dy * keep_scale), then g *= act'(z) with act'(z) = 1
//   where z > 0, else 0 (relu) or slope (leaky_relu), as torch's threshold/leaky_relu backward;
//   the BatchRenorm backward then runs on g (sums S(g), S(g*u), dx = A*(g - mean_g) + B*u).
//
// The mask stream: element e = offset + (row-major logical index) takes word (e & 3) of the
// Philox4x32-10 output for counter (q lo, q hi, 0, 2), q = e >> 2, key = seed; kept where
// philox_uniform(word) >= float(p). Four elements share one Philox call, so a kernel that
// walks e in order computes one call per four elements (mask_words below).
#pragma once

#include <stdint.h>

#include "hd.h"
#include "philox.h"

namespace speckle {

enum Activation { kIdentity = 0, kRelu = 1, kLeakyRelu = 2 };
constexpr uint32_t kMaskStream = 2;  // counter word c3 of the dropout mask

// The activation's slope where z <= 0 (1 for identity): relu is leaky_relu with slope 0.
SPECKLE_HD float negative_side_slope(int activation, float negative_slope) {
  return activation == kIdentity ? 1.0f : (activation == kRelu ? 0.0f : negative_slope);
}

// act(z) given negative_side_slope's value; identity passes z through unchanged.
SPECKLE_HD float activate(float z, float slope) { return z > 0.0f ? z : z * slope; }

// act'(z) * g.
SPECKLE_HD float activate_backward(float z, float g, float slope) { return z > 0.0f ? g : g * slope; }

// The four mask words of counter q (elements 4q .. 4q+3).
SPECKLE_HD void mask_words(uint64_t seed, uint64_t q, uint32_t words[4]) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = 0,
           c3 = kMaskStream;
  philox4x32_10(seed, c0, c1, c2, c3);
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// Whether element e is kept (one Philox call; kernels share a call among four elements).
SPECKLE_HD bool mask_keep(uint64_t seed, uint64_t e, float p) {
  uint32_t words[4];
  mask_words(seed, e >> 2, words);
  return philox_uniform(words[e & 3]) >= p;
}

// Dropout parameters of one call. active: training and p > 0.
struct DropoutParams {
  uint64_t seed, offset;
  float p, keep_scale;
  bool active;
};

}  // namespace speckle
