"""Image-quality metrics of the paper (section 3, eq. 5 and 6), batched on the tensor's device.

    PSNR = 10 log10(R^2 / MSE)                                       (eq. 5, R = 255 for 8 bits)
    SSIM = (2 mu_x mu_y + c1)(2 s_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2))  (eq. 6)
    c1 = (0.01 R)^2, c2 = (0.03 R)^2

Input convention: both functions take images *in [0, data_range]*, shaped (N, C, H, W) or
(N, H, W) or (H, W), and return one value per image (a tensor of shape (N,); a 0-d tensor for
one (H, W) image). The networks work on images normalized to [-1, 1] ((v - 0.5) / 0.5 with
v = u8 / 255): convert them with `from_normalized` first, then call with data_range=1.0. That
equals the 8-bit metric of the paper, since PSNR and SSIM only depend on x / R. Nothing here
clamps: a prediction outside [0, data_range] is measured as it is (the tools clamp, as an
8-bit image would).

SSIM follows Wang et al. (2004) exactly as scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` does:
an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma, normalized to sum 1), local
moments by a separable 'valid' convolution, then the mean of the SSIM map. scikit-image filters
with reflect padding and then crops (win_size - 1) // 2 = 5 pixels from every side before the
mean; the valid convolution yields that cropped map directly, so the borders agree without
padding. Channels are averaged per image (scikit-image's channel_axis behaviour). Local
variances use E[x^2] - E[x]^2 like scikit-image; computing in float64 (the default, supported
by CPU and CUDA) keeps that cancellation far below the 1e-4 agreement the tests ask for.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


__all__ = ["psnr", "ssim", "gaussian_window", "from_normalized"]

K1, K2 = 0.01, 0.03


def from_normalized(x: torch.Tensor) -> torch.Tensor:
    """Map images normalized as (v - 0.5) / 0.5 back to v in [0, 1] (no clamping)."""
    return x * 0.5 + 0.5


def _as_nchw(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be torch tensors")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred and target are on different devices: {pred.device} vs {target.device}")
    if pred.dim() not in (2, 3, 4):
        raise ValueError(f"expected (H, W), (N, H, W) or (N, C, H, W) images, got shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError("empty images")
    if pred.is_complex() or target.is_complex():
        raise TypeError("complex images are not supported")
    single = pred.dim() == 2
    if pred.dim() == 2:
        pred, target = pred[None, None], target[None, None]
    elif pred.dim() == 3:  # (N, H, W): N one-channel images
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    return pred, target, single


def _check_range(data_range: float) -> float:
    data_range = float(data_range)
    if not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return data_range


def _compute_dtype(pred: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float32 if pred.device.type == "mps" else torch.float64


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, *,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range^2 / MSE) (eq. 5).

    Identical images give +inf. The result is float64 by default (float32 on MPS).
    """
    pred, target, single = _as_nchw(pred, target)
    data_range = _check_range(data_range)
    ct = _compute_dtype(pred, dtype)
    mse = (pred.to(ct) - target.to(ct)).square().flatten(1).mean(1)
    out = 10.0 * torch.log10(data_range ** 2 / mse)
    return out[0] if single else out


def gaussian_window(win_size: int = 11, sigma: float = 1.5, *, dtype=torch.float64,
                    device=None) -> torch.Tensor:
    """The 1-D normalized Gaussian taps (win_size,) centred on the middle tap."""
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and positive, got {win_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    half = win_size // 2
    t = torch.arange(-half, half + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, *,
         win_size: int | None = None, sigma: float = 1.5, k1: float = K1, k2: float = K2,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean structural similarity per image (eq. 6) with a Gaussian window.

    win_size defaults to the one scikit-image derives from sigma (2 * int(3.5 sigma + 0.5) + 1,
    i.e. 11 for sigma 1.5). Images must be at least win_size pixels on each side. The result is
    float64 by default (float32 on MPS).
    """
    pred, target, single = _as_nchw(pred, target)
    data_range = _check_range(data_range)
    if win_size is None:
        win_size = 2 * int(3.5 * sigma + 0.5) + 1
    h, w = pred.shape[-2:]
    if h < win_size or w < win_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {win_size}x{win_size} SSIM window")
    ct = _compute_dtype(pred, dtype)
    n, c = pred.shape[:2]
    x = pred.to(ct).reshape(n * c, 1, h, w)
    y = target.to(ct).reshape(n * c, 1, h, w)
    g = gaussian_window(win_size, sigma, dtype=ct, device=pred.device)

    # One separable pass over the five moment maps stacked along the batch.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=0)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1))
    stack = F.conv2d(stack, g.view(1, 1, -1, 1))
    mx, my, mxx, myy, mxy = stack.chunk(5, dim=0)
    vx = mxx - mx * mx
    vy = myy - my * my
    cxy = mxy - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = smap.flatten(1).mean(1).view(n, c).mean(1)
    return out[0] if single else out
