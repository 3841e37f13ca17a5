"""Philox4x32-10, the counter-based generator behind every random stream of the package: its
constants, the counter word that keeps the streams apart, the uniform map, and the generator
in torch integer ops (the oracle of every kernel's bits).

    key       (k0, k1) = (seed & 0xFFFFFFFF, seed >> 32),  0 <= seed < 2**63
    round     (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
              then k0 += W0, k1 += W1 (mod 2**32); ten rounds (Salmon et al., SC'11)
    streams   the counter's last word c3 names the stream:
                  STREAM_NOISE    0  the speckle noise of an element   (noise_stream.py)
                  STREAM_SIGMA    1  the per-image sigma of the noise  (noise_stream.py)
                  STREAM_DROPOUT  2  the norm block's dropout mask     (batch_renorm_act_contract.py)
    uniform   u(r) = float32(v) * UNIFORM_SCALE, v = r if r < 2**31 else 2**32 - 1 - r
              (Triton's uint_to_uniform_float: u in [0, 1), 2**31 levels)

Triton's tl.philox / tl.randint4x are this generator; the C++ and CUDA kernels use
csrc/include/philox.h, which holds the same constants (kPhiloxMulA = M0, kPhiloxMulB = M1,
kPhiloxKeyA/B = W0/W1, kMaskStream = STREAM_DROPOUT).
"""
from __future__ import annotations

import numpy as np
import torch

U32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplies c0
PHILOX_M1 = 0xCD9E8D57  # multiplies c2
PHILOX_W0 = 0x9E3779B9  # Weyl increments of the two key words
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10

STREAM_NOISE, STREAM_SIGMA, STREAM_DROPOUT = 0, 1, 2


def _mul_hi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b held
    in int64, without overflowing int64 (split a into 16-bit halves)."""
    s = (a >> 16) * b
    t = (a & 0xFFFF) * b
    hi = (s + (t >> 16)) >> 16
    lo = (((s & 0xFFFF) << 16) + t) & U32
    return hi, lo


def philox4x32_10(seed, c0, c1, c2, c3):
    """Philox4x32-10 on int64 tensors holding uint32 counters; key = (seed lo, seed hi), seed an
    int or an int64 tensor. Returns the four output words (int64 tensors in [0, 2**32))."""
    k0, k1 = seed & U32, (seed >> 32) & U32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_M1, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_M0, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_W0) & U32
        k1 = (k1 + PHILOX_W1) & U32
    return c0, c1, c2, c3


_UNIFORM_SCALE_F32 = float(np.float32(UNIFORM_SCALE))  # exact in float32: no rounding where it meets one


def uniform_torch(r: torch.Tensor) -> torch.Tensor:
    """Philox words (int64 holding uint32) -> the streams' float32 uniforms."""
    v = torch.where(r >= 2 ** 31, U32 - r, r)
    return v.to(torch.float32) * _UNIFORM_SCALE_F32
