"""The phantom's speckle-free target (version 3): the expected gray level of the speckled image.

A fine pixel of the speckled image is G = clip(a (10 log10 I) + b, 0, 255), a = 255 / DISPLAY_DB,
b = a (DISPLAY_DB - TOP_DB), with I = |A|^2 the simulated intensity (phantom.py). The target is
E[G] per fine pixel, then the same area average down to the output grid as the image. Three
things decide it:

1. The local mean intensity mu = E[I] = (R * K2)(z, x): the reflectivity blurred by the
   pulse's intensity profile K2 = |h(z) g(x)|^2 / sum |h g|^2, with h the analytic pulse along
   depth (the inverse FFT of phantom.pulse_spectrum, its taper included: a Gaussian envelope's
   sigma / sqrt 2 is not the intensity profile of a tapered spectrum) and g the lateral blur
   matrix's taps. Along depth the convolution is circular, as the simulation's FFT is;
   across it is the lateral matrix squared, zero outside, as the simulation's matmul is.
2. The distribution of X = I / mu at the scatterer density d (phantom.scatterer_density). Given
   which cells hold a scatterer, A = sum_k b_k a_k w_k / sqrt(d) (b_k ~ Bernoulli(d), a_k ~ N(0, 1),
   w_k the complex PSF taps, scaled so E X = 1). For d = 1 X is exponential (E 10 log10 X =
   -2.51 dB, the Rayleigh constant); for sparse scatterers it has heavier tails and a lower mean
   log (about -2.9 dB at d = 0.1). X is sampled by Monte Carlo (SAMPLES independent draws per d
   on DENSITIES, a fixed generator: the target is reproducible), the same model the simulation
   draws from. Where the density varies within the PSF, d is the effective density that gives
   the same relative variance of the conditional intensity V = sum_k b_k |w_k|^2 R_k / d_k
   (E log I = E log V - 0.577 nepers, and E log V = log E V - Var V / (2 (E V)^2) to second
   order): (1 - d_eff) / d_eff = (K4 * (R^2 (1 - d) / d)) / (K2 * R)^2, with K4 = |h g|^4 and
   K2 = |h g|^2 normalized (exact for a homogeneous region).
3. The display's clip: E[G](mu, d) = E[clip(a (10 log10 mu + 10 log10 X) + b, 0, 255)], from the
   sorted samples of 10 log10 X and their cumulative sums, on a grid of mu (GRID_STEP_DB) per d,
   then bilinear in (d, 10 log10 mu). Where the floor clips, E[G] is above clip(E[...]) (what
   version 2 used), and below the floor the target stays above 0 as the image does.

Monte Carlo error: the standard deviation of 10 log10 X is ~5.6 dB (d = 1) to ~7 dB (d = 0.1),
so E[10 log10 X] is known to ~0.04 dB (0.2 gray levels) with SAMPLES = 32768.
"""
from __future__ import annotations

import functools
import math

import torch

from speckle_models.data import phantom as P

DENSITIES = tuple(0.1 + 0.05 * i for i in range(19))      # 0.1 ... 1.0
SAMPLES = 32768
GRID_STEP_DB = 0.05
_GRID_LOW_DB = -(P.DISPLAY_DB - P.TOP_DB) - 45.0              # 45 dB below the floor: E[G] ~ 0
_GRID_HIGH_DB = P.TOP_DB + 45.0
_SEED = 20_261_203


@functools.lru_cache(maxsize=4)
def _psf(physics: P.Physics, depth: int = 64, width: int = 64) -> torch.Tensor:
    """The complex analytic PSF (depth, width), centred at (depth // 2, width // 2), float64."""
    delta = torch.zeros(1, depth, width)
    delta[0, depth // 2, width // 2] = 1.0
    return P.analytic_rf(delta, physics)[0].transpose(0, 1).to(torch.complex128)


def axial_profile(physics: P.Physics, depth: int, power: int = 2) -> torch.Tensor:
    """|h(t)|^power of the analytic pulse for circular lags t = 0 .. depth - 1, summing to 1."""
    h = torch.fft.ifft(P.pulse_spectrum(depth, physics).to(torch.complex128), n=depth)
    k = h.abs() ** power
    return k / k.sum()


def lateral_matrix(width: int, power: int = 2) -> torch.Tensor:
    """(width, width) matrix M with M[x', x] = g(x - x')^power / sum g^power (zero outside the
    band): the lateral part of the intensity (power 2) or fourth-moment (power 4) blur."""
    b = P._blur_matrix(width, P.SIGMA_LATERAL).double() ** power
    half = math.ceil(3.5 * P.SIGMA_LATERAL)
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / P.SIGMA_LATERAL) ** 2)
    taps = taps / taps.sum()
    return b / (taps ** power).sum()


def blur(field: torch.Tensor, physics: P.Physics, power: int = 2) -> torch.Tensor:
    """field (n, depth, width) on the fine grid blurred by |h g|^power (normalized): circular
    along depth (FFT), banded matrix across."""
    f = field.double() @ lateral_matrix(field.shape[2], power)
    k = axial_profile(physics, field.shape[1], power)
    return torch.fft.irfft(torch.fft.rfft(f, dim=1) * torch.fft.rfft(k).view(1, -1, 1),
                           n=field.shape[1], dim=1)


def mean_intensity(echo_fine: torch.Tensor, physics) -> torch.Tensor:
    """E|A|^2 (n, depth, width) for echogenicity maps on the simulation grid (exact in the
    speckle model: the reflectivity blurred by the pulse's intensity profile)."""
    return blur(P.reflectivity(echo_fine), P.physics_of(physics), 2)


def effective_density(echo_fine: torch.Tensor, physics) -> torch.Tensor:
    """The density whose homogeneous speckle has the same conditional-intensity variance."""
    physics = P.physics_of(physics)
    r2 = P.reflectivity(echo_fine).double() ** 2
    d = P.scatterer_density(echo_fine).double()
    mu = blur(P.reflectivity(echo_fine), physics, 2)
    q = blur(r2 * (1 - d) / d, physics, 4) / (mu * mu).clamp_min(1e-300)
    return (1.0 / (1.0 + q.clamp_min(0.0))).clamp(DENSITIES[0], 1.0)


@functools.lru_cache(maxsize=4)
def log_samples(physics: P.Physics) -> torch.Tensor:
    """(len(DENSITIES), SAMPLES) sorted draws of 10 log10 X, X = I / E[I], per density. The
    PSF taps above 1e-6 of the peak intensity (the rest hold < 1e-4 of the energy) carry a
    Gaussian amplitude each; one uniform draw per tap decides occupancy at every density
    (common random numbers: the table is smooth in d)."""
    w = _psf(physics).flatten()
    w = w[w.abs() ** 2 > 1e-6 * (w.abs() ** 2).max()]
    wr = torch.stack([w.real, w.imag], 1)                       # (K, 2)
    energy = (w.abs() ** 2).sum()
    g = torch.Generator().manual_seed(_SEED)
    u = torch.rand(SAMPLES, len(w), generator=g, dtype=torch.float64)
    a = torch.randn(SAMPLES, len(w), generator=g, dtype=torch.float64)
    rows = []
    for d in DENSITIES:
        x = ((a * (u < d)) @ wr).square().sum(1) / (d * energy)
        rows.append(torch.sort(10.0 * torch.log10(x.clamp_min(1e-30))).values)
    return torch.stack(rows)


def log_bias_db(density: float, physics=P.PHANTOM_VERSION) -> float:
    """E[10 log10 X] at a density (interpolated on DENSITIES): -2.51 dB for d = 1."""
    s = log_samples(P.physics_of(physics)).mean(1)
    pos = (min(max(density, DENSITIES[0]), 1.0) - DENSITIES[0]) / (DENSITIES[1] - DENSITIES[0])
    i = min(int(pos), len(DENSITIES) - 2)
    return float(torch.lerp(s[i], s[i + 1], pos - i))


@functools.lru_cache(maxsize=4)
def gray_table(physics: P.Physics) -> torch.Tensor:
    """(len(DENSITIES), grid) E[G] over the mean-intensity grid _GRID_LOW_DB.._GRID_HIGH_DB."""
    s = log_samples(physics)                                     # sorted, (D, M)
    m = s.shape[1]
    csum = torch.cat([torch.zeros(len(s), 1, dtype=s.dtype), s.cumsum(1)], 1)
    mu = torch.arange(_GRID_LOW_DB, _GRID_HIGH_DB + GRID_STEP_DB / 2, GRID_STEP_DB, dtype=torch.float64)
    a = 255.0 / P.DISPLAY_DB
    b = a * (P.DISPLAY_DB - P.TOP_DB)
    # G = 0 for s < s0, 255 for s > s1, a (mu + s) + b in between
    s0 = (-b / a - mu).expand(len(s), -1).contiguous()
    s1 = ((255.0 - b) / a - mu).expand(len(s), -1).contiguous()
    i0 = torch.searchsorted(s, s0)
    i1 = torch.searchsorted(s, s1, right=True)
    linear = (a * mu + b) * (i1 - i0) + a * (csum.gather(1, i1) - csum.gather(1, i0))
    return (linear + 255.0 * (m - i1)) / m


def expected_gray(echo_fine: torch.Tensor, physics) -> torch.Tensor:
    """E[G] (n, depth, width), float32, on the simulation grid (before the area average)."""
    physics = P.physics_of(physics)
    table = gray_table(physics)
    mu_db = 10.0 * torch.log10(mean_intensity(echo_fine, physics).clamp_min(1e-30))
    d = effective_density(echo_fine, physics)
    pd = (d - DENSITIES[0]) / (DENSITIES[1] - DENSITIES[0])
    pm = ((mu_db - _GRID_LOW_DB) / GRID_STEP_DB).clamp(0, table.shape[1] - 1)
    i = pd.floor().long().clamp(0, len(DENSITIES) - 2)
    j = pm.floor().long().clamp(0, table.shape[1] - 2)
    u, v = pd - i, pm - j
    flat = table.flatten()
    cols = table.shape[1]

    def at(ii, jj):
        return flat[ii * cols + jj]

    top = torch.lerp(at(i, j), at(i, j + 1), v)
    bottom = torch.lerp(at(i + 1, j), at(i + 1, j + 1), v)
    return torch.lerp(top, bottom, u).float()
