"""Classical despeckling filters from scikit-image, as the yardstick for the networks.

Every filter works on the same noisy images as the networks (intensities in [0, 1], float64)
and its output is clipped to [0, 1]. Each has one or two strength parameters; `tune` picks
them by the mean PSNR on a few *validation* images with the same noise settings, so the
filters get the same chance to adapt to the noise level as the networks, without looking at
the test images.

    median     skimage.filters.median, square footprint of size s
    bilateral  skimage.restoration.denoise_bilateral(sigma_color, sigma_spatial)
    tv         skimage.restoration.denoise_tv_chambolle(weight)           (Chambolle 2004)
    nlm        skimage.restoration.denoise_nl_means(h = k * sigma_est, fast_mode=True,
               patch 5, distance 6); sigma_est by Immerkaer's Laplacian-difference estimate
               (skimage's estimate_sigma would need PyWavelets, one more dependency)

Bilateral and NL-means cost tens of milliseconds per 128x128 image on a CPU, so the tools run
the filters on a subsample of the test images (speckle-reproduce --baseline-count).
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np

GRIDS = {
    "median": {"size": (3, 5, 7)},
    "bilateral": {"sigma_color": (0.05, 0.1, 0.2, 0.4), "sigma_spatial": (1.0, 3.0)},
    "tv": {"weight": (0.02, 0.05, 0.1, 0.2, 0.4)},
    "nlm": {"h_factor": (0.6, 0.9, 1.2)},
}
FILTERS = tuple(GRIDS)
DISPLAY_NAMES = {"median": "median", "bilateral": "bilateral", "tv": "total variation (Chambolle)",
                 "nlm": "non-local means"}


def noise_sigma(image: np.ndarray) -> float:
    """Immerkaer (1996): sigma ~ sqrt(pi/2) / (6 (W-2)(H-2)) * sum |image * M| over the
    interior, M the difference of two Laplacians (zero response to planes)."""
    from scipy.ndimage import convolve

    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
    h, w = image.shape
    if h < 3 or w < 3:
        return 0.0
    r = convolve(image.astype(np.float64), m, mode="nearest")[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2) * np.abs(r).sum() / (6 * (w - 2) * (h - 2)))


def apply_filter(name: str, image: np.ndarray, **params) -> np.ndarray:
    """Denoise one (H, W) image in [0, 1] with the named filter."""
    from skimage import filters, restoration

    if name == "median":
        out = filters.median(image, footprint=np.ones((params["size"],) * 2, dtype=bool))
    elif name == "bilateral":
        out = restoration.denoise_bilateral(image, sigma_color=params["sigma_color"],
                                            sigma_spatial=params["sigma_spatial"], channel_axis=None)
    elif name == "tv":
        out = restoration.denoise_tv_chambolle(image, weight=params["weight"])
    elif name == "nlm":
        sigma = noise_sigma(image)
        out = restoration.denoise_nl_means(image, h=params["h_factor"] * max(sigma, 1e-3), sigma=sigma,
                                           patch_size=5, patch_distance=6, fast_mode=True,
                                           channel_axis=None)
    else:
        raise ValueError(f"unknown filter {name!r}; expected one of {', '.join(FILTERS)}")
    return np.clip(out, 0.0, 1.0)


def apply_all(name: str, images: np.ndarray, **params) -> np.ndarray:
    """Filter a stack (N, H, W)."""
    return np.stack([apply_filter(name, img, **params) for img in images])


def _psnr(pred: np.ndarray, target: np.ndarray) -> float:
    mse = ((pred - target) ** 2).reshape(len(pred), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def tune(name: str, noisy: np.ndarray, clean: np.ndarray) -> dict:
    """The grid point of `name` with the best mean PSNR on (noisy, clean) validation images."""
    grid = GRIDS[name]
    best, best_score = None, -np.inf
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        score = _psnr(apply_all(name, noisy, **params), clean)
        if score > best_score:
            best, best_score = params, score
    return best


def run_baselines(val_noisy: np.ndarray, val_clean: np.ndarray, test_noisy: np.ndarray,
                  filters=FILTERS) -> dict:
    """Tune each filter on the validation images, then denoise the test images.

    Returns {name: {"params": ..., "denoised": (N, H, W) array, "time_s": seconds on test}}.
    """
    results = {}
    for name in filters:
        params = tune(name, val_noisy, val_clean)
        t0 = time.perf_counter()
        denoised = apply_all(name, test_noisy, **params)
        results[name] = {"params": params, "denoised": denoised, "time_s": time.perf_counter() - t0}
    return results
