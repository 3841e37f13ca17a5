"""OBNLM: the optimized Bayesian non-local means filter for ultrasound speckle (Coupe, Hellier,
Kervrann & Barillot 2009, "Nonlocal means-based speckle filtering for ultrasound images",
IEEE TIP 18(10):2221-2229), as a batched torch function.

Noise model (the paper's eq. 7): u = v + v^gamma eta, eta ~ N(0, sigma^2); gamma = 0.5 fits
log-compressed display images (the paper's finding), gamma = 1 is the multiplicative model of
intensity data. The Bayesian derivation replaces NL-means' Euclidean block distance by the
Pearson distance (eq. 12), here averaged over the block's P = (2a + 1)^2 pixels:

    d_P(B_y, B_{y+delta}) = (1/P) sum_p (u(y + p) - u(y + delta + p))^2 / u(y + delta + p)^(2 gamma)

with weight w(y, delta) = exp(-d_P / h^2) for every offset delta in the search window
|delta|_inf <= M, and the centre's own weight w(y, 0) = max over delta != 0 (the paper's rule,
so a block does not outvote its best match). Blockwise estimate (the paper's section III-C):
each block centred at y is restored as a whole, B_hat(y) = sum_delta w u(B_{y+delta}) / sum_delta w,
and a pixel's value is the mean of the estimates of the P blocks that contain it:

    u_hat(x) = (1/P) sum_delta u(x + delta) sum_{y in B(x)} w(y, delta) / W(y),   W(y) = sum_delta w(y, delta)

computed in two passes over the offsets (W, then the sum), never storing all weights; the
weights of a block are scaled by its largest (a common factor that W removes), so a small h
cannot underflow every weight to a 0 / 0.

Smoothing: h^2 = h_factor * 2 sigma_hat^2, where sigma_hat^2 is a per-image estimate of the
model's noise variance: the median over pixels of (u - m3)^2 / max(m3, EPS)^(2 gamma) * 9/8,
m3 the 3x3 mean (9/8: the pixel is part of its own mean); two blocks of the same signal differ
by 2 sigma^2 per pixel on average, so h_factor ~ 1 smooths at the noise level.

Deviations from the paper, for a batched implementation: every block is used (block step
n = 1, no sub-sampling) and there is no block pre-selection (a speed device: mean and variance
ratio tests); borders are reflect-padded. Defaults: search radius M = 5 (11 x 11 window),
block radius a = 2 (5 x 5 blocks, NL-means' patch in baselines.py).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

EPS = 1e-6


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    return F.avg_pool2d(x, 2 * radius + 1, stride=1)


def noise_variance(u4: torch.Tensor, gamma: float) -> torch.Tensor:
    """(N, 1, 1, 1) estimate of sigma^2 in u = v + v^gamma eta (module docstring)."""
    m3 = _box_mean(F.pad(u4, (1, 1, 1, 1), mode="replicate"), 1)
    r = (u4 - m3) ** 2 / m3.clamp_min(EPS) ** (2 * gamma) * (9.0 / 8.0)
    return r.flatten(1).median(1).values.clamp_min(EPS * EPS).view(-1, 1, 1, 1)


def obnlm(x: torch.Tensor, *, h_factor: float = 1.0, gamma: float = 0.5, search: int = 5,
          block: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """OBNLM of images (N, H, W) or (N, 1, H, W) with non-negative values; same shape, dtype."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("obnlm: x must be a floating-point torch.Tensor")
    shape = tuple(x.shape)
    if not (x.dim() == 3 or (x.dim() == 4 and shape[1] == 1)) or min(shape[-2:]) < 1:
        raise ValueError(f"obnlm: x must have shape (N, H, W) or (N, 1, H, W), got {shape}")
    for name, v in (("search", search), ("block", block)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"obnlm: {name} must be an int >= 1, got {v!r}")
    for name, v in (("h_factor", h_factor), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0 and v < float("inf")):
            raise ValueError(f"obnlm: {name} must be finite and > 0, got {v!r}")
    if bool((x < 0).any()):
        raise ValueError("obnlm: the Pearson distance needs non-negative values")
    u = x.to(dtype).reshape(shape[0], 1, shape[-2], shape[-1])
    h, w = shape[-2:]
    m, a = int(search), int(block)
    pad = m + 2 * a
    mode = "reflect" if pad < min(h, w) else "replicate"
    U = F.pad(u, (pad, pad, pad, pad), mode=mode)
    inv_h2 = 1.0 / (float(h_factor) * 2.0 * noise_variance(u, float(gamma)))
    ref = U[..., m:m + h + 4 * a, m:m + w + 4 * a]                # block pixels of centres y
    offsets = [(dz, dx) for dz in range(-m, m + 1) for dx in range(-m, m + 1) if (dz, dx) != (0, 0)]

    def log_weight(dz: int, dx: int) -> torch.Tensor:           # (N, 1, H + 2a, W + 2a)
        other = U[..., m + dz:m + dz + h + 4 * a, m + dx:m + dx + w + 4 * a]
        d = (ref - other) ** 2 / other.clamp_min(EPS) ** (2 * float(gamma))
        return -_box_mean(d, a) * inv_h2

    # Pass 1: W(y) in units of the largest weight (log-sum-exp, so that no weight underflows
    # to a 0 / 0 when h is small); the centre's weight, the largest of the others, is 1 there.
    top = torch.full((shape[0], 1, h + 2 * a, w + 2 * a), -torch.inf, dtype=dtype, device=u.device)
    total = torch.zeros_like(top)
    for dz, dx in offsets:
        lw = log_weight(dz, dx)
        new_top = torch.maximum(top, lw)
        total = total * torch.exp(top - new_top) + torch.exp(lw - new_top)
        top = new_top
    total += 1.0
    # Pass 2: the blockwise aggregation of the normalized weights
    out = _box_mean(1.0 / total, a) * u
    for dz, dx in offsets:
        shifted = U[..., pad + dz:pad + dz + h, pad + dx:pad + dx + w]
        out += _box_mean(torch.exp(log_weight(dz, dx) - top) / total, a) * shifted
    return out.reshape(shape)
