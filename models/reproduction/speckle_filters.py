"""Classical speckle filters (Lee, Kuan, Frost, SRAD) as batched torch functions.

Every function takes a float tensor of shape (N, H, W) or (N, 1, H, W) (N images of
intensities, nominally in [0, 1]), works on the tensor's own device (CPU or GPU), in `dtype`
(default torch.float32; pass torch.float64 for reference precision), without a Python loop
over pixels or images (SRAD loops over its iterations), and returns a tensor of the input's
shape in `dtype`, clipped to [0, 1] like the scikit-image baselines (models/reproduction/baselines.py).

Speckle model (all four filters): z = x * u, with u a unit-mean speckle of variance C_u^2
(C_u: the noise coefficient of variation), independent of the image x.

Window statistics (Lee, Kuan, Frost and the C_u^2 estimate): for an odd window w, the local
mean m and variance v of z are box averages over the w x w window centred on each pixel,
v = mean(z^2) - m^2 (computed on z minus its image mean, which leaves v unchanged and reduces
cancellation; clamped at 0), with *reflect* padding at the borders (the edge pixel is not
repeated: numpy.pad mode "reflect", torch F.pad mode "reflect"), so a window needs
w // 2 < min(H, W). Local coefficient of variation: C_z^2 = v / m^2.

Noise-variation coefficient C_u^2 (`speckle_cv2`), when not given: a homogeneous-region
estimate per image: the median of the local C_z^2 (window w) over the pixels whose local mean
exceeds HOMOGENEOUS_FLOOR (0.25) times the image mean. In a homogeneous speckled region
C_z^2 ~ C_u^2; the median down-weights edges and texture (larger C_z^2), and the floor drops
dark (anechoic) regions, where an additive noise floor makes C_z^2 meaningless. The median is
the lower one for an even count (torch.nanmedian); 0 when no pixel qualifies. Lee and Kuan
use C_u^2 = cu2_factor * (cu2 if given, else this estimate); the tunable factor plays the
role of the NL-means baseline's multiple of its noise estimate.

Lee (Lee 1980, "Digital image enhancement and noise filtering by use of local statistics",
IEEE TPAMI 2(2):165-168), multiplicative case with the linearised model
v ~ var_x + m^2 C_u^2:
    x_hat = m + k (z - m),   k = var_x / v,   var_x = max(v - C_u^2 m^2, 0)
i.e. k = max(0, 1 - C_u^2 / C_z^2) (Lopes et al. 1990); k = 0 where v = 0.

Kuan (Kuan, Sawchuk, Strand & Chavel 1985, "Adaptive noise smoothing filter for images with
signal-dependent noise", IEEE TPAMI 7(2):165-177), the exact LMMSE estimate for z = x u:
    x_hat = m + k (z - m),   k = var_x / v,   var_x = max(v - C_u^2 m^2, 0) / (1 + C_u^2)
i.e. k = max(0, 1 - C_u^2 / C_z^2) / (1 + C_u^2); k = 0 where v = 0.

Frost (Frost, Stiles, Shanmugan & Holtzman 1982, "A model for radar images and its
application to adaptive digital filtering of multiplicative noise", IEEE TPAMI 4(2):157-166),
in the form of Lopes et al. 1990 (IEEE TGRS 28(6):992-1000) and common software:
    x_hat(p) = sum_q M(p, q) z(q) / sum_q M(p, q),   M(p, q) = exp(-K C_z^2(p) |p - q|)
over the w x w window around p, |p - q| the Euclidean distance in pixels, K the damping
factor, C_z^2(p) = v / max(m^2, EPS^2). Homogeneous windows (small C_z^2) get a near-uniform
mean; heterogeneous ones weight the centre. Computed by grouping the window's offsets by
distance: one conv2d with one 0/1 ring kernel per distinct distance.

SRAD (Yu & Acton 2002, "Speckle reducing anisotropic diffusion", IEEE TIP 11(11):1260-1270),
explicit scheme on the 4-neighbourhood with unit grid spacing. With I = I^n and the one-sided
differences dN = I(i-1,j) - I, dS = I(i+1,j) - I, dW = I(i,j-1) - I, dE = I(i,j+1) - I:
    G2 = (dN^2 + dS^2 + dW^2 + dE^2) / I^2,    L = (dN + dS + dW + dE) / I
    q^2 = (G2 / 2 - L^2 / 16) / (1 + L / 4)^2                 (instantaneous coefficient of variation)
    c = 1 / (1 + (q^2 - q0(t)^2) / (q0(t)^2 (1 + q0(t)^2))),  clipped to [0, 1]
    I^{n+1} = I + dt [c(i+1,j) dS + c(i,j) dN + c(i,j+1) dE + c(i,j) dW]
The update is conservative (the flux between two neighbours uses one coefficient), so the
image mean is preserved, and each new value is a convex combination of old ones for
dt <= 1/4 (the stability bound enforced here; codes that write the step as (lambda/4) * div
have lambda = 4 dt). Edges: zero flux (Neumann; replicate padding, so differences across the
border are 0). In the divisions I is floored at EPS (1e-6): intensities are assumed >= 0.
q0(t) = q0 exp(-rho t) at diffusion time t = n dt of step n (Yu & Acton's approximation);
q0 = q0_factor * (q0 if given, else sqrt(speckle_cv2(input, window))), floored at EPS;
rho defaults to 1/6.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

EPS = 1e-6
HOMOGENEOUS_FLOOR = 0.25
SRAD_MAX_DT = 0.25
DTYPES = (torch.float32, torch.float64)

__all__ = ["lee_filter", "kuan_filter", "frost_filter", "srad", "speckle_cv2", "local_stats",
           "EPS", "HOMOGENEOUS_FLOOR", "SRAD_MAX_DT"]


def _prepare(x, dtype, name: str):
    """(N, 1, H, W) tensor in dtype, and a function restoring the input's layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must have a floating-point dtype, got {x.dtype}")
    if dtype not in DTYPES:
        raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got {dtype!r}")
    shape = tuple(x.shape)
    if not (x.dim() == 3 or (x.dim() == 4 and shape[1] == 1)):
        raise ValueError(f"{name}: x must have shape (N, H, W) or (N, 1, H, W), got {shape}")
    if shape[-1] < 1 or shape[-2] < 1:
        raise ValueError(f"{name}: empty images, shape {shape}")
    x4 = x.to(dtype).reshape(shape[0], 1, shape[-2], shape[-1])
    return x4, lambda y: y.clamp(0.0, 1.0).reshape(shape)


def _check_window(window, x4: torch.Tensor, name: str) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"{name}: window must be an int, got {window!r}")
    if window < 3 or window % 2 == 0:
        raise ValueError(f"{name}: window must be an odd integer >= 3, got {window}")
    h, w = x4.shape[-2:]
    if window // 2 >= min(h, w):
        raise ValueError(f"{name}: window {window} too large for {h}x{w} images "
                         f"(reflect padding needs window // 2 < min(H, W))")
    return int(window)


def _check_number(value, what: str, name: str, *, low: float = 0.0, strict: bool = False,
                  high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: {what} must be a real number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or v < low or (strict and v == low) or (high is not None and v > high)
    if bad:
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{name}: {what} must be {rng} (finite), got {value!r}")
    return v


def local_stats(x4: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mean and variance over window x window boxes, reflect padding; x4 (N, 1, H, W)."""
    p = window // 2
    mu = x4.mean(dim=(-2, -1), keepdim=True)
    xp = F.pad(x4 - mu, (p, p, p, p), mode="reflect")
    m = F.avg_pool2d(xp, window, stride=1)
    v = (F.avg_pool2d(xp * xp, window, stride=1) - m * m).clamp_min(0.0)
    return m + mu, v


def _cv2_estimate(x4: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Median local C_z^2 over pixels brighter than HOMOGENEOUS_FLOOR x image mean: (N, 1, 1, 1)."""
    floor = HOMOGENEOUS_FLOOR * x4.mean(dim=(-2, -1), keepdim=True)
    valid = m > floor
    cz2 = torch.where(valid, v / torch.where(valid, m * m, torch.ones_like(m)), torch.nan)
    est = torch.nanmedian(cz2.flatten(1), dim=1).values
    return torch.nan_to_num(est, nan=0.0).view(-1, 1, 1, 1)


def speckle_cv2(x, window: int = 7, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Homogeneous-region estimate of C_u^2 per image (see the module docstring): shape (N,)."""
    x4, _ = _prepare(x, dtype, "speckle_cv2")
    window = _check_window(window, x4, "speckle_cv2")
    m, v = local_stats(x4, window)
    return _cv2_estimate(x4, m, v).flatten()


def _lee_kuan(x, window, cu2, cu2_factor, dtype, name: str, kuan: bool) -> torch.Tensor:
    x4, restore = _prepare(x, dtype, name)
    window = _check_window(window, x4, name)
    factor = _check_number(cu2_factor, "cu2_factor", name, strict=True)
    m, v = local_stats(x4, window)
    if cu2 is None:
        c = _cv2_estimate(x4, m, v) * factor
    else:
        c = torch.tensor(_check_number(cu2, "cu2", name) * factor, dtype=dtype, device=x4.device)
    var_x = (v - c * m * m).clamp_min(0.0)
    if kuan:
        var_x = var_x / (1.0 + c)
    k = var_x / v.clamp_min(torch.finfo(dtype).tiny)
    return restore(m + k * (x4 - m))


def lee_filter(x, window: int = 7, *, cu2: float | None = None, cu2_factor: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Lee (1980) filter; C_u^2 = cu2_factor * (cu2, or the per-image speckle_cv2 estimate)."""
    return _lee_kuan(x, window, cu2, cu2_factor, dtype, "lee_filter", kuan=False)


def kuan_filter(x, window: int = 7, *, cu2: float | None = None, cu2_factor: float = 1.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kuan et al. (1985) filter; C_u^2 as in lee_filter."""
    return _lee_kuan(x, window, cu2, cu2_factor, dtype, "kuan_filter", kuan=True)


def _rings(window: int, dtype, device):
    """Distinct distances d_r in a window, one 0/1 kernel per distance, and their counts."""
    p = window // 2
    off = torch.arange(-p, p + 1, dtype=torch.float64)
    d2 = off[:, None] ** 2 + off[None, :] ** 2
    levels = torch.unique(d2)
    kernels = (d2[None] == levels[:, None, None]).to(dtype)
    return (levels.sqrt().to(dtype=dtype, device=device), kernels[:, None].to(device),
            kernels.sum(dim=(1, 2)).to(device))


def frost_filter(x, window: int = 5, *, damping: float = 2.0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frost et al. (1982) filter with damping factor K = damping (>= 0; 0 is a box mean)."""
    name = "frost_filter"
    x4, restore = _prepare(x, dtype, name)
    window = _check_window(window, x4, name)
    k = _check_number(damping, "damping", name)
    m, v = local_stats(x4, window)
    alpha = k * v / (m * m).clamp_min(EPS * EPS)
    dist, kernels, counts = _rings(window, dtype, x4.device)
    p = window // 2
    sums = F.conv2d(F.pad(x4, (p, p, p, p), mode="reflect"), kernels)     # (N, R, H, W)
    weights = torch.exp(-alpha * dist.view(1, -1, 1, 1))
    out = (weights * sums).sum(1, keepdim=True) / (weights * counts.view(1, -1, 1, 1)).sum(1, keepdim=True)
    return restore(out)


def srad(x, iterations: int = 30, *, dt: float = 0.25, q0: float | None = None,
         q0_factor: float = 1.0, rho: float = 1.0 / 6.0, window: int = 7,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Yu & Acton (2002) speckle reducing anisotropic diffusion: `iterations` explicit steps of
    size dt (0 < dt <= 0.25); q0(t) = q0_factor * (q0 or sqrt(speckle_cv2(x, window))) * exp(-rho t)."""
    name = "srad"
    x4, restore = _prepare(x, dtype, name)
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(f"{name}: iterations must be an int, got {iterations!r}")
    if iterations < 0:
        raise ValueError(f"{name}: iterations must be >= 0, got {iterations}")
    dt = _check_number(dt, "dt", name, strict=True, high=SRAD_MAX_DT)
    rho = _check_number(rho, "rho", name)
    factor = _check_number(q0_factor, "q0_factor", name, strict=True)
    if q0 is None:
        window = _check_window(window, x4, name)
        q = _cv2_estimate(x4, *local_stats(x4, window)).sqrt() * factor
    else:
        q = torch.tensor(_check_number(q0, "q0", name, strict=True) * factor, dtype=dtype,
                         device=x4.device)
    q = q.clamp_min(EPS)
    img = x4
    for n in range(int(iterations)):
        q2 = (q * math.exp(-rho * n * dt)) ** 2
        P = F.pad(img, (1, 1, 1, 1), mode="replicate")
        dn, ds = P[..., :-2, 1:-1] - img, P[..., 2:, 1:-1] - img
        dw, de = P[..., 1:-1, :-2] - img, P[..., 1:-1, 2:] - img
        inv = 1.0 / img.clamp_min(EPS)
        g2 = (dn * dn + ds * ds + dw * dw + de * de) * inv * inv
        lap = (dn + ds + dw + de) * inv
        qi2 = (0.5 * g2 - lap * lap / 16.0) / (1.0 + 0.25 * lap) ** 2
        # 1 / (1 + (qi2 - q2) / (q2 (1 + q2))), the same number without an infinity at qi2 = inf
        c = (q2 * (1.0 + q2) / (q2 * q2 + qi2)).clamp(0.0, 1.0)
        cp = F.pad(c, (0, 1, 0, 1), mode="replicate")
        img = img + dt * (cp[..., 1:, :-1] * ds + c * dn + cp[..., :-1, 1:] * de + c * dw)
    return restore(img)
