"""Classical despeckling filters (scikit-image, speckle_filters.py, optional BM3D): the yardstick.

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

The speckle filters of models/reproduction/speckle_filters.py (batched torch; the whole stack in one call,
float32, on `device`) and, optionally, BM3D:

    lee        Lee (1980), window w, C_u^2 = cu2_factor * per-image homogeneous-region estimate
    kuan       Kuan et al. (1985), the same parameters
    frost      Frost et al. (1982), window w, damping factor K
    srad       Yu & Acton (2002), `iterations` steps of dt = 0.25 (the stability bound),
               q0(t) = q0_factor * q0_est * exp(-t / 6)
    bm3d       BM3D (Dabov et al. 2007; Makinen et al. 2020) through the optional package `bm3d`
               (PyPI; "free for non-commercial use" only), sigma = k * Immerkaer's estimate; one
               image per call (the binary costs ~1.3 s per call here, whatever the image size)

Grids: from a sweep of wider grids on the phantom (8 validation images, factors 1, 5, 10,
48x48 and 128x128 images). Best points: Lee/Kuan w 3 with C_u^2 factor 0.5 at x1, w 5-7 with
factor 1-2 at x5/x10; Frost w 3 K 32 at x1, w 5 K 2 at x5, w 7 K 0.5 at x10; SRAD 2 steps with
q0 x0.5 at x1, 5 steps with q0 x1 at x5/x10; BM3D k = 1 at every factor (of 0.25, 0.5, 1, 2).
Each grid holds these points. The C_u^2 estimate includes the phantom's own speckle (the
clean images are speckled B-mode images), hence factors below 1 at low noise.

Bilateral and NL-means cost tens of milliseconds per 128x128 image on a CPU, so the tools run
the filters on a subsample of the test images (speckle-reproduce --baseline-count).
run_baselines reports each method's run time on the test images and per image.
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
    "lee": {"window": (3, 5, 7), "cu2_factor": (0.25, 0.5, 1.0, 2.0)},
    "kuan": {"window": (3, 5, 7), "cu2_factor": (0.25, 0.5, 1.0, 2.0)},
    "frost": {"window": (3, 5, 7), "damping": (0.5, 2.0, 8.0, 32.0)},
    "srad": {"iterations": (2, 5, 10, 20), "q0_factor": (0.5, 1.0, 2.0)},
    "bm3d": {"sigma_factor": (0.7, 1.0, 1.4)},
}
FILTERS = tuple(GRIDS)                       # every known filter, installed or not
TORCH_FILTERS = ("lee", "kuan", "frost", "srad")
OPTIONAL_PACKAGES = {"bm3d": "bm3d"}         # filter -> the optional package it needs
DISPLAY_NAMES = {"median": "median", "bilateral": "bilateral", "tv": "total variation (Chambolle)",
                 "nlm": "non-local means", "lee": "Lee", "kuan": "Kuan", "frost": "Frost",
                 "srad": "SRAD (Yu & Acton)", "bm3d": "BM3D"}
BM3D_LICENSE = "free for non-commercial use only (bm3d package metadata and LICENSE, Tampere University)"


def missing_filters() -> dict:
    """{filter: why it cannot run} for the optional filters whose package is not installed."""
    import importlib.util

    return {name: f"optional package {pkg!r} not installed (pip install {pkg}; {BM3D_LICENSE})"
            for name, pkg in OPTIONAL_PACKAGES.items() if importlib.util.find_spec(pkg) is None}


def available_filters() -> tuple:
    """FILTERS less the optional ones whose package is absent: run_baselines' default."""
    missing = missing_filters()
    return tuple(f for f in FILTERS if f not in missing)


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


def bm3d_denoise(image: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D of one (H, W) image for white noise of standard deviation sigma, clipped to [0, 1].
    Needs the optional package bm3d (free for non-commercial use only)."""
    try:
        import bm3d
    except ImportError as e:
        raise ImportError(f"the bm3d filter needs the optional package 'bm3d' (pip install bm3d; "
                          f"{BM3D_LICENSE}): {e}") from e
    if image.ndim != 2:
        raise ValueError(f"bm3d_denoise: expected one (H, W) image, got shape {image.shape}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"bm3d_denoise: sigma must be finite and > 0, got {sigma!r}")
    out = bm3d.bm3d(np.asarray(image, dtype=np.float64), sigma_psd=float(sigma))
    return np.clip(np.asarray(out, dtype=np.float64).reshape(image.shape), 0.0, 1.0)


def _torch_filter(name: str, images: np.ndarray, device, **params) -> np.ndarray:
    """A speckle_filters function on the whole (N, H, W) stack at once, in float32 on device."""
    import torch

    from speckle_models.reproduction import speckle_filters as sf

    fn = {"lee": sf.lee_filter, "kuan": sf.kuan_filter, "frost": sf.frost_filter, "srad": sf.srad}[name]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float64)).to(device or "cpu")
    return fn(x, **params).to("cpu", torch.float64).numpy()


def apply_filter(name: str, image: np.ndarray, **params) -> np.ndarray:
    """Denoise one (H, W) image in [0, 1] with the named filter."""
    if name in TORCH_FILTERS:
        return _torch_filter(name, image[None], None, **params)[0]
    if name == "bm3d":
        return bm3d_denoise(image, params["sigma_factor"] * max(noise_sigma(image), 1e-3))
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


def apply_all(name: str, images: np.ndarray, device=None, **params) -> np.ndarray:
    """Filter a stack (N, H, W): the torch filters in one batched call on `device` (default
    CPU), the others image by image on the CPU."""
    if name in TORCH_FILTERS:
        return _torch_filter(name, images, device, **params)
    return np.stack([apply_filter(name, img, **params) for img in images])


def _psnr(pred: np.ndarray, target: np.ndarray) -> float:
    mse = ((pred - target) ** 2).reshape(len(pred), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def tune(name: str, noisy: np.ndarray, clean: np.ndarray, device=None) -> dict:
    """The grid point of `name` with the best mean PSNR on (noisy, clean) validation images."""
    grid = GRIDS[name]
    best, best_score = None, -np.inf
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        score = _psnr(apply_all(name, noisy, device, **params), clean)
        if score > best_score:
            best, best_score = params, score
    return best


def run_baselines(val_noisy: np.ndarray, val_clean: np.ndarray, test_noisy: np.ndarray,
                  filters=None, device=None) -> dict:
    """Tune each filter on the validation images, then denoise the test images.

    filters: names from FILTERS (default: available_filters(), i.e. BM3D only when its package
    is installed; missing_filters() says what was left out). device: where the torch filters
    run (default CPU; the timing then includes the copies to and from it).

    Returns {name: {"params": tuned grid point, "denoised": (N, H, W) float64 array,
    "time_s": seconds to denoise the N test images, "seconds_per_image": time_s / N,
    "tune_time_s": seconds spent tuning, "n_images": N, "device": where it ran}}.
    """
    import torch

    filters = available_filters() if filters is None else tuple(filters)
    unknown = [f for f in filters if f not in GRIDS]
    if unknown:
        raise ValueError(f"unknown filter(s) {unknown}; expected names from {', '.join(FILTERS)}")
    absent = {f: why for f, why in missing_filters().items() if f in filters}
    if absent:
        raise ImportError("; ".join(f"{f}: {why}" for f, why in absent.items()))
    dev = torch.device(device or "cpu")
    n = len(test_noisy)
    results = {}
    for name in filters:
        on = dev if name in TORCH_FILTERS else torch.device("cpu")
        t0 = time.perf_counter()
        params = tune(name, val_noisy, val_clean, on)
        t1 = time.perf_counter()
        denoised = apply_all(name, test_noisy, on, **params)   # ends with a copy to the host
        seconds = time.perf_counter() - t1
        results[name] = {"params": params, "denoised": denoised, "time_s": seconds,
                         "seconds_per_image": seconds / max(n, 1), "tune_time_s": t1 - t0,
                         "n_images": n, "device": str(on)}
    return results
