"""Classical despeckling filters (scikit-image/SciPy, speckle_filters.py, obnlm.py, optional
BM3D): the yardstick, tuned on validation images only.

Every filter works on the images the networks see (display gray levels in [0, 1], float64)
and its output is clipped to [0, 1]. Its strength parameters are tuned by tuning.grid_search:
the best mean PSNR over the validation images (at least TUNE_IMAGES of them, the same noise
settings), the grid growing until the chosen value is inside it; the tables mark a value
left on a grid edge or on its domain bound.

    median     scipy.ndimage.median_filter, square footprint of size s (reflect borders)
    bilateral  skimage.restoration.denoise_bilateral(sigma_color, sigma_spatial)
    tv         skimage.restoration.denoise_tv_chambolle(weight)             (Chambolle 2004)
    nlm        skimage.restoration.denoise_nl_means(h = k * sigma_est, fast_mode=True,
               patch 5, distance 6); sigma_est by Immerkaer's Laplacian-difference estimate
    lee, kuan  Lee (1980), Kuan et al. (1985): window w, C_u^2 = cu2_factor * per-image estimate
    frost      Frost et al. (1982): window w, damping factor K
    srad       Yu & Acton (2002): `iterations` steps of dt = 0.25, q0 = q0_factor * estimate
    obnlm      Coupe et al. (2009), obnlm.py: h^2 = h_factor * 2 sigma_hat^2 (search 11 x 11,
               blocks 5 x 5); gamma = 0.5 on display values (the paper's), 1 on intensities
    bm3d       BM3D (Dabov et al. 2007; Makinen et al. 2020) through the optional package `bm3d`
               (free for non-commercial use only: BM3D_LICENSE), sigma = k * Immerkaer's
               estimate, one image per call

Domains (the despeckling table): "display" filters the gray levels as they are; "intensity"
decompresses them to intensity, I = 10^((v - 1) DISPLAY_DB / 10) (v = 1 is 1), filters, and
recompresses, v = 1 + (10 log10 I - 2.51 dB) / DISPLAY_DB: the -2.51 dB (the mean log of fully
developed speckle) puts a perfect estimate of the local mean intensity on the expected gray
level, which is what the speckle-free target is. DESIGN_DOMAIN says where each filter's noise
model holds: the multiplicative speckle filters on intensity; NL-means, TV, bilateral, median
and BM3D assume additive noise, which speckle is after log compression (display values), and
OBNLM's gamma = 0.5 model was fitted to display images. run_baselines tunes each filter in its
design domain and on display values (of the domains asked for: domains_for), so the speckle
filters in both and the others on display values only, and keeps the better on validation (it
says which). The paper-protocol tables add noise to display values multiplicatively, so there
every filter runs on display values.
"""
from __future__ import annotations

import math
import time

import numpy as np

from speckle_models.reproduction.tuning import Axis, grid_search

_WIN = dict(grow="add", step=2, low=3, high=31, integer=True)
AXES = {
    "median": {"size": Axis((3, 5, 7), **_WIN)},
    "bilateral": {"sigma_color": Axis((0.05, 0.1, 0.2), low=1e-3, high=10.0),
                  "sigma_spatial": Axis((1.0, 2.0, 4.0), low=0.5, high=8.0)},
    "tv": {"weight": Axis((0.02, 0.05, 0.1, 0.2), step=2.0, low=1e-4, high=100.0)},
    "nlm": {"h_factor": Axis((0.9, 2.0, 4.5), step=1.5, low=0.05, high=100.0)},
    "lee": {"window": Axis((3, 5, 7), **_WIN), "cu2_factor": Axis((0.25, 0.5, 1.0, 2.0), low=1 / 64, high=64.0)},
    "kuan": {"window": Axis((3, 5, 7), **_WIN), "cu2_factor": Axis((0.25, 0.5, 1.0, 2.0), low=1 / 64, high=64.0)},
    "frost": {"window": Axis((3, 5, 7), **_WIN), "damping": Axis((0.5, 2.0, 8.0, 32.0), step=4.0, low=1 / 256, high=4096.0)},
    "srad": {"iterations": Axis((2, 5, 10, 20), low=1, high=640, integer=True),
             "q0_factor": Axis((0.5, 1.0, 2.0), low=1 / 16, high=16.0)},
    "obnlm": {"h_factor": Axis((2.0, 4.0, 8.0), low=1 / 64, high=256.0)},
    # Immerkaer's estimate assumes white noise and sees ~1/10 of speckle's correlated spread:
    # the optimum factor is ~10-20 on speckle (1 for white noise); each BM3D call costs seconds
    "bm3d": {"sigma_factor": Axis((11.3, 16.0, 22.6), step=math.sqrt(2), low=0.05, high=256.0)},
}
FILTERS = tuple(AXES)                        # every known filter, installed or not
TORCH_FILTERS = ("lee", "kuan", "frost", "srad", "obnlm")
OPTIONAL_PACKAGES = {"bm3d": "bm3d"}         # filter -> the optional package it needs
DOMAINS = ("display", "intensity")
DESIGN_DOMAIN = {"median": "display", "bilateral": "display", "tv": "display", "nlm": "display",
                 "bm3d": "display", "obnlm": "display", "lee": "intensity", "kuan": "intensity",
                 "frost": "intensity", "srad": "intensity"}
DISPLAY_NAMES = {"median": "median", "bilateral": "bilateral", "tv": "total variation (Chambolle)",
                 "nlm": "non-local means", "lee": "Lee", "kuan": "Kuan", "frost": "Frost",
                 "srad": "SRAD (Yu & Acton)", "obnlm": "OBNLM (Coupé et al.)", "bm3d": "BM3D"}
BM3D_LICENSE = "free for non-commercial use only (bm3d package metadata and LICENSE, Tampere University)"
TUNE_IMAGES = 32


def domains_for(name: str, domains) -> tuple:
    """The domains `name` is tuned in, of those asked for: its design domain and display values
    (one domain for the filters designed for display values)."""
    wanted = (DESIGN_DOMAIN[name], "display")
    return tuple(d for d in domains if d in wanted) or tuple(domains)


def missing_filters() -> dict:
    """{filter: why it cannot run} for the optional filters whose package is not installed."""
    import importlib.util

    return {name: f"optional package {pkg!r} not installed (pip install {pkg}; {BM3D_LICENSE})"
            for name, pkg in OPTIONAL_PACKAGES.items() if importlib.util.find_spec(pkg) is None}


def available_filters() -> tuple:
    """FILTERS less the optional ones whose package is absent: run_baselines' default."""
    missing = missing_filters()
    return tuple(f for f in FILTERS if f not in missing)


def to_domain(images01: np.ndarray, domain: str) -> np.ndarray:
    from speckle_models.data.phantom import DISPLAY_DB

    if domain == "display":
        return images01
    return np.power(10.0, (images01 - 1.0) * (DISPLAY_DB / 10.0))


def from_domain(values: np.ndarray, domain: str) -> np.ndarray:
    from speckle_models.data.phantom import DISPLAY_DB, RAYLEIGH_LOG_BIAS_DB

    if domain == "display":
        return np.clip(values, 0.0, 1.0)
    db = 10.0 * np.log10(np.maximum(values, 1e-30))
    return np.clip(1.0 + (db - RAYLEIGH_LOG_BIAS_DB) / DISPLAY_DB, 0.0, 1.0)


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
    """BM3D of one (H, W) image for white noise of standard deviation sigma (not clipped).
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
    return np.asarray(out, dtype=np.float64).reshape(image.shape)


def _torch_filter(name: str, images: np.ndarray, device, domain: str, **params) -> np.ndarray:
    """A batched torch filter on the whole (N, H, W) stack at once, float32 on `device`."""
    import torch

    from speckle_models.reproduction import speckle_filters as sf
    from speckle_models.reproduction.obnlm import obnlm

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float64)).to(device or "cpu")
    if name == "obnlm":
        y = obnlm(x, gamma=0.5 if domain == "display" else 1.0, **params)
    else:
        fn = {"lee": sf.lee_filter, "kuan": sf.kuan_filter, "frost": sf.frost_filter, "srad": sf.srad}[name]
        y = fn(x, **params)
    return y.to("cpu", torch.float64).numpy()


def _one(name: str, image: np.ndarray, **params) -> np.ndarray:
    if name == "bm3d":
        return bm3d_denoise(image, params["sigma_factor"] * max(noise_sigma(image), 1e-6))
    from scipy.ndimage import median_filter
    from skimage import restoration

    if name == "median":
        return median_filter(image, size=params["size"], mode="reflect")
    if name == "bilateral":
        return restoration.denoise_bilateral(image, sigma_color=params["sigma_color"],
                                             sigma_spatial=params["sigma_spatial"], channel_axis=None)
    if name == "tv":
        return restoration.denoise_tv_chambolle(image, weight=params["weight"])
    if name == "nlm":
        sigma = max(noise_sigma(image), 1e-6)
        return restoration.denoise_nl_means(image, h=params["h_factor"] * sigma, sigma=sigma,
                                            patch_size=5, patch_distance=6, fast_mode=True,
                                            channel_axis=None)
    raise ValueError(f"unknown filter {name!r}; expected one of {', '.join(FILTERS)}")


def apply_all(name: str, images01: np.ndarray, device=None, domain: str = "display",
              **params) -> np.ndarray:
    """Filter a stack (N, H, W) of display images in [0, 1] in `domain`; the torch filters in
    one batched call on `device` (default CPU), the others image by image."""
    if name not in AXES:
        raise ValueError(f"unknown filter {name!r}; expected one of {', '.join(FILTERS)}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    x = to_domain(np.asarray(images01, dtype=np.float64), domain)
    if name in TORCH_FILTERS:
        y = _torch_filter(name, x, device, domain, **params)
    else:
        y = np.stack([_one(name, img, **params) for img in x]) if len(x) else x.copy()
    return from_domain(y, domain)


def apply_filter(name: str, image: np.ndarray, domain: str = "display", **params) -> np.ndarray:
    """Denoise one (H, W) display image in [0, 1] with the named filter."""
    return apply_all(name, image[None], None, domain, **params)[0]


def _psnr(pred: np.ndarray, target: np.ndarray) -> float:
    mse = ((pred - target) ** 2).reshape(len(pred), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def axes_for(name: str, size: int) -> dict:
    """The filter's axes, windows capped to what reflect padding allows on size x size images."""
    largest = size - 1 if size % 2 == 0 else size - 2
    return {k: (a.with_high(largest) if a.integer and a.grow == "add" else a)
            for k, a in AXES[name].items()}


def tune(name: str, noisy: np.ndarray, target: np.ndarray, device=None, domain: str = "display") -> dict:
    """grid_search of `name` in `domain` by mean PSNR on (noisy, target) validation images."""
    return grid_search(axes_for(name, min(noisy.shape[-2:])),
                       lambda p: _psnr(apply_all(name, noisy, device, domain, **p), target))


def run_baselines(val_noisy: np.ndarray, val_target: np.ndarray, test_noisy: np.ndarray,
                  filters=None, device=None, domains=("display",), log=None) -> dict:
    """Tune each filter in each domain on the validation images, keep the better domain, then
    denoise the test images.

    filters: names from FILTERS (default: available_filters(), i.e. BM3D only when its package
    is installed). device: where the torch filters run (default CPU; the timing then includes
    the copies to and from it). log: called with one line per filter when it is done. Returns {name: {"params", "domain", "marks", "val_psnr",
    "domains": {domain: {"params", "marks", "val_psnr", "grid", "evaluated"}}, "denoised"
    (N, H, W), "val_denoised", "time_s", "seconds_per_image", "tune_time_s", "n_images",
    "device"}}.
    """
    import torch

    filters = available_filters() if filters is None else tuple(filters)
    unknown = [f for f in filters if f not in AXES]
    if unknown:
        raise ValueError(f"unknown filter(s) {unknown}; expected names from {', '.join(FILTERS)}")
    absent = {f: why for f, why in missing_filters().items() if f in filters}
    if absent:
        raise ImportError("; ".join(f"{f}: {why}" for f, why in absent.items()))
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ValueError(f"domains must be taken from {DOMAINS}, got {domains!r}")
    dev = torch.device(device or "cpu")
    n = len(test_noisy)
    results = {}
    for name in filters:
        on = dev if name in TORCH_FILTERS else torch.device("cpu")
        t0 = time.perf_counter()
        per_domain = {d: tune(name, val_noisy, val_target, on, d) for d in domains_for(name, domains)}
        domain = max(per_domain, key=lambda d: per_domain[d]["score"])
        chosen = per_domain[domain]
        t1 = time.perf_counter()
        denoised = apply_all(name, test_noisy, on, domain, **chosen["params"])
        seconds = time.perf_counter() - t1
        results[name] = {
            "params": chosen["params"], "domain": domain, "marks": chosen["marks"],
            "val_psnr": chosen["score"],
            "domains": {d: {k: r[k] for k in ("params", "marks", "grid", "evaluated", "rounds")}
                        | {"val_psnr": r["score"]} for d, r in per_domain.items()},
            "denoised": denoised,
            "val_denoised": apply_all(name, val_noisy, on, domain, **chosen["params"]),
            "time_s": seconds, "seconds_per_image": seconds / max(n, 1),
            "tune_time_s": t1 - t0, "n_images": n, "device": str(on)}
        if log is not None:
            log(f"{name}: {domain}, {chosen['params']}, validation PSNR {chosen['score']:.2f} dB, "
                f"tuned in {t1 - t0:.0f} s ({sum(r['evaluated'] for r in per_domain.values())} points), "
                f"{seconds / max(n, 1) * 1e3:.3g} ms per test image")
    return results
