"""Gaussian smoothing and Gaussian-derivative gradients of image batches, separable, on the
tensor's device: the local-mean maps, edge strengths and mask fills of the real-scan judge
(real_scan.py) and of the self-supervised objectives (training/self_supervised.py).

    gaussian_blur(x, sigma)                 G_sigma * x                   (x: (N, 1, H, W))
    gaussian_gradient(x, sigma)             |grad (G_sigma * x)| = sqrt((G'_z * G_x * x)^2 + (G_z * G'_x * x)^2)
    masked_blur(x, weight, sigma)           G * (w x) / G * w             (normalized convolution)

sigma may be one number or (sigma_z, sigma_x) (along H, along W). Taps: the sampled Gaussian
on [-ceil(4 sigma), ceil(4 sigma)], normalized to sum 1 (psnr_ssim.gaussian_window); the
derivative taps are -t / sigma^2 times the same samples, so a unit ramp x = t has derivative 1
up to the truncation at 4 sigma (relative error ~1e-4). Borders: replicate padding (any image
size works; a border acts as a constant continuation, so a straight edge meeting the border
at right angles stays straight). Sampling a Gaussian of sigma >= 1 aliases by exp(-2 pi^2
sigma^2) <= 3e-9 of the response: below float32 resolution, so closed forms computed in the
continuum hold to rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speckle_models.metrics.psnr_ssim import gaussian_window

__all__ = ["gaussian_blur", "gaussian_gradient", "masked_blur"]


def _sigmas(sigma) -> tuple[float, float]:
    s = (float(sigma), float(sigma)) if isinstance(sigma, (int, float)) else tuple(float(v) for v in sigma)
    if len(s) != 2 or not all(math.isfinite(v) and v >= 0 for v in s):
        raise ValueError(f"sigma must be a number or (sigma_z, sigma_x) >= 0, got {sigma!r}")
    return s


def _taps(sigma: float, derivative: bool, dtype, device) -> torch.Tensor:
    if sigma == 0:
        if derivative:
            raise ValueError("a derivative needs sigma > 0")
        return torch.ones(1, dtype=dtype, device=device)
    half = max(1, math.ceil(4 * sigma))
    g = gaussian_window(2 * half + 1, sigma, dtype=dtype, device=device)
    if derivative:
        # conv2d correlates: y(c) = sum_u w(u) x(c + u), and d/dc (G * x)(c) = sum_u G'(-u) x(c + u)
        # with G'(-u) = u G(u) / sigma^2, so the taps are u g(u) / sigma^2 (a unit ramp gives 1)
        t = torch.arange(-half, half + 1, dtype=dtype, device=device)
        g = t * g / sigma ** 2
    return g


def _separable(x: torch.Tensor, taps_z: torch.Tensor, taps_x: torch.Tensor) -> torch.Tensor:
    pz, px = taps_z.numel() // 2, taps_x.numel() // 2
    y = F.pad(x, (px, px, pz, pz), mode="replicate") if (pz or px) else x
    if px:
        y = F.conv2d(y, taps_x.view(1, 1, 1, -1))
    if pz:
        y = F.conv2d(y, taps_z.view(1, 1, -1, 1))
    return y


def _as_n1hw(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch.Tensor")
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"x must be (N, 1, H, W), got shape {tuple(x.shape)}")
    return x


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """G_sigma * x of an (N, 1, H, W) batch (replicate borders), in x's dtype."""
    x = _as_n1hw(x)
    sz, sx = _sigmas(sigma)
    return _separable(x, _taps(sz, False, x.dtype, x.device), _taps(sx, False, x.dtype, x.device))


def gaussian_gradient(x: torch.Tensor, sigma) -> torch.Tensor:
    """Gradient magnitude of G_sigma * x (Gaussian-derivative filters), (N, 1, H, W)."""
    x = _as_n1hw(x)
    sz, sx = _sigmas(sigma)
    kw = dict(dtype=x.dtype, device=x.device)
    dz = _separable(x, _taps(sz, True, **kw), _taps(sx, False, **kw))
    dx = _separable(x, _taps(sz, False, **kw), _taps(sx, True, **kw))
    return torch.sqrt(dz * dz + dx * dx)


def masked_blur(x: torch.Tensor, weight: torch.Tensor, sigma, *, floor: float = 1e-6) -> torch.Tensor:
    """Normalized convolution G * (w x) / G * w: the local weighted mean of x from the pixels
    with w > 0 only (w = 0 pixels do not leak in); where G * w < floor the plain G * x."""
    x = _as_n1hw(x)
    w = weight.to(x.dtype).expand_as(x)
    num = gaussian_blur(x * w, sigma)
    den = gaussian_blur(w, sigma)
    return torch.where(den > floor, num / den.clamp_min(floor), gaussian_blur(x, sigma))
