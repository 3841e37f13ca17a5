"""Per-image scores of a method's outputs, the same for networks, filters and the noisy input.

Against the target (display gray levels in [0, 1]): PSNR and SSIM (metrics/psnr_ssim.py).
With the speckle-free target the structure metrics join, on the phantom's known geometry
(data/phantom_regions.py, from each image's geometry row):

    gcnr  gCNR (metrics/speckle_stats.gcnr, adaptive Rice bins) between each valid lesion and
          its surroundings, on the display values; the mean over an image's valid lesions (NaN
          for an image without one: it is left out of that metric's means and comparisons)
    fom   Pratt's figure of merit (metrics/edges.py) in the band within EDGE_BAND pixels of the
          known boundaries; ideal edges: the detector on the speckle-free map in that band
    beta  Sattar's beta against the speckle-free map over the same band
    snr   speckle SNR mu / sigma of the envelope A = 10^(dB / 20) (the display value
          decompressed; 1.91 for fully developed speckle) in WINDOWS homogeneous windows of
          the speckle-free map (lowest standard deviation, mean gray above WINDOW_MIN_GRAY,
          side S // 10, at least 8), averaged over them
    enl   equivalent number of looks mu^2 / sigma^2 of the intensity A^2 in the same windows

snr and enl describe the smoothing (higher: smoother; the speckle-free map's own values are
the reference row); they are not compared. The compared metrics are all "higher is better".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speckle_models.metrics.psnr_ssim import psnr, ssim

METRICS = {"clean": ("psnr", "ssim"),
           "speckle-free": ("psnr", "ssim", "gcnr", "fom", "beta", "snr", "enl")}
COMPARED = {"clean": ("psnr", "ssim"), "speckle-free": ("psnr", "ssim", "gcnr", "fom", "beta")}
METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "gcnr": "gCNR", "fom": "Pratt's FOM",
                "beta": "β", "snr": "speckle SNR", "enl": "ENL"}
EDGE_BAND = 3.0
WINDOWS = 2
WINDOW_MIN_GRAY = 0.3


@dataclass
class Regions:
    """What the structure metrics of one image set measure on."""
    lesion: torch.Tensor        # (N, 3, S, S) bool
    surround: torch.Tensor      # (N, 3, S, S) bool
    valid: torch.Tensor         # (N, 3) bool
    band: np.ndarray            # (N, S, S) bool
    ideal: np.ndarray           # (N, S, S) bool: the detector's edges of the target in the band
    windows: torch.Tensor | None   # (WINDOWS, N, S, S) bool, or None when none fit
    target01: torch.Tensor      # (N, 1, S, S) float64


def make_regions(target01: torch.Tensor, geometry: torch.Tensor) -> Regions:
    from speckle_models.data.phantom_regions import edge_band, known_boundaries, lesion_regions
    from speckle_models.metrics.edges import canny_edges
    from speckle_models.metrics.speckle_stats import homogeneous_windows

    t = target01.double().cpu()
    size = t.shape[-1]
    lesion, surround, valid = lesion_regions(geometry, size)
    band = edge_band(known_boundaries(geometry, size), EDGE_BAND).numpy()
    ideal = canny_edges(t, band)
    try:
        windows = homogeneous_windows(t, max(8, size // 10), WINDOWS, by="std",
                                      min_mean=WINDOW_MIN_GRAY)
    except ValueError:
        windows = None
    return Regions(lesion, surround, valid, band, ideal, windows, t)


def envelope(display01: torch.Tensor) -> torch.Tensor:
    """Display gray levels in [0, 1] -> envelope amplitude (a 0 dB reflector is 1)."""
    from speckle_models.data.phantom import DISPLAY_DB, TOP_DB

    return torch.pow(10.0, (display01 * DISPLAY_DB - (DISPLAY_DB - TOP_DB)) / 20.0)


def _gcnr(pred: torch.Tensor, r: Regions) -> np.ndarray:
    from speckle_models.metrics.speckle_stats import gcnr

    n = pred.shape[0]
    total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for k in range(r.valid.shape[1]):
        idx = r.valid[:, k].nonzero().flatten()
        if len(idx) == 0:
            continue
        total[idx] += gcnr(pred[idx], r.lesion[idx, k], r.surround[idx, k], bins="rice")
        count[idx] += 1
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan).numpy()


def _window_stats(pred: torch.Tensor, r: Regions) -> tuple[np.ndarray, np.ndarray]:
    from speckle_models.metrics.speckle_stats import enl, speckle_snr

    n = pred.shape[0]
    if r.windows is None:
        nan = np.full(n, np.nan)
        return nan, nan.copy()
    a = envelope(pred)
    snr = torch.stack([speckle_snr(a, w) for w in r.windows]).mean(0)
    looks = torch.stack([enl(a * a, w) for w in r.windows]).mean(0)
    return snr.numpy(), looks.numpy()


def score_images(pred01: torch.Tensor, target01: torch.Tensor, regions: Regions | None = None) -> dict:
    """{metric: (N,) float64 numpy array} for outputs in [0, 1] against their targets; the
    structure metrics when regions (speckle-free target) are given."""
    from speckle_models.metrics.edges import beta, pratt_fom

    p = pred01.double().cpu()
    t = target01.double().cpu()
    out = {"psnr": psnr(p, t).numpy(), "ssim": ssim(p, t).numpy()}
    if regions is None:
        return out
    if p.shape != regions.target01.shape:
        raise ValueError(f"outputs {tuple(p.shape)} and regions {tuple(regions.target01.shape)} differ")
    out["gcnr"] = _gcnr(p, regions)
    out["fom"] = pratt_fom(p, regions.ideal, regions.band)
    out["beta"] = beta(p, regions.target01, regions.band)
    out["snr"], out["enl"] = _window_stats(p, regions)
    return out
