"""Speckle metrics inside the tissue, before and after, that a blur or a grey veil cannot pass.

Inputs: the gray level v in [0, 1] of a frame before and after (as written), and the tissue
mask (the pixels the denoiser may change). B-mode scanner pixels are log-compressed, so:

- The homogeneous window (speckle SNR, ENL) is chosen by the lowest local standard deviation
  (speckle_stats.homogeneous_windows' by="std", the rule for log-compressed data, where fully
  developed speckle has a constant std rather than a constant coefficient of variation), among
  the windows that lie wholly inside the tissue and whose mean is at least MIN_MEAN_FRACTION
  (0.5) of the tissue's median: a near-black (anechoic) patch has a low std because it is
  clipped at black, not because it is smooth tissue. Chosen on the input; the same window after.
- gCNR between two boxes (--roi-a/--roi-b), each intersected with the tissue, with adaptive
  bins: the Rice rule, bins = ceil(2 n^(1/3)) for the n pixels of both regions together, within
  [8, 256]. The estimate's upward bias for two equal distributions is about
  sqrt(bins / (pi n)) (speckle_stats' docstring), so 256 fixed bins over, say, 2 x 400 pixels
  would report ~0.32 for two identical regions; the Rice rule gives ~0.10 there, and the bias
  shrinks as n^(-1/3) with the regions' size.
- edge_preservation = sum over edge pixels of |grad(G_s * after)| / the same of before, G_s a
  Gaussian of sigma = SIGMA (3 px), edge pixels the top EDGE_FRACTION (10 %) of
  |grad(G_s * before)| in the tissue (one pixel in from its border). At sigma = 3 the speckle
  grain is averaged out of both, so this compares the structures' edges: 1 when they keep
  their contrast, < 1 for a blur (the smoothed edge flattens further) or a veil that lowers
  contrast (a v + b with a < 1 gives a).
- local_mean_change = mean over the tissue of |G_s * after - G_s * before| (v units, i.e. a
  fraction of full scale): a despeckler moves the speckle around the local mean, not the mean
  itself; a grey veil (or a brightness drift) moves it everywhere.
ENL alone rewards any smoothing; read it beside these two.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from speckle_models.metrics.speckle_stats import cnr, enl, gcnr, homogeneous_windows, speckle_snr

MIN_MEAN_FRACTION = 0.5
SIGMA = 3.0
EDGE_FRACTION = 0.10
MIN_BINS, MAX_BINS = 8, 256


def rice_bins(n: int) -> int:
    """ceil(2 n^(1/3)) within [MIN_BINS, MAX_BINS] (module docstring)."""
    return int(min(MAX_BINS, max(MIN_BINS, math.ceil(2.0 * n ** (1.0 / 3.0)))))


def tissue_window(before: np.ndarray, tissue: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
    """(top, left, size, size) of the input's most homogeneous window inside the tissue
    (module docstring), or None when no window fits."""
    if min(before.shape) < size or tissue.sum() < size * size:
        return None
    x = torch.from_numpy(before.astype(np.float64))[None]
    floor = MIN_MEAN_FRACTION * float(np.median(before[tissue]))
    try:
        _, boxes = homogeneous_windows(x, size, by="std", within=torch.from_numpy(tissue), min_mean=floor,
                                       return_boxes=True)
    except ValueError:  # no window lies wholly inside the tissue above the floor
        return None
    return tuple(int(b) for b in boxes[0, 0])


def _smoothed(v: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(v.astype(np.float64), SIGMA, mode="reflect")


def edge_preservation(before: np.ndarray, after: np.ndarray, tissue: np.ndarray) -> float | None:
    """Edge contrast kept (module docstring); None when the tissue has no interior."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(tissue, np.ones((3, 3), bool))
    if inner.sum() < 10:
        return None
    grads = []
    for v in (before, after):
        s = _smoothed(v)
        grads.append(np.hypot(ndimage.sobel(s, 0), ndimage.sobel(s, 1))[inner])
    g0, g1 = grads
    edges = g0 >= np.quantile(g0, 1 - EDGE_FRACTION)
    total = g0[edges].sum()
    return float(g1[edges].sum() / total) if total > 0 else None


def local_mean_change(before: np.ndarray, after: np.ndarray, tissue: np.ndarray) -> float:
    """mean |G_s * after - G_s * before| over the tissue, in v units."""
    return float(np.abs(_smoothed(after) - _smoothed(before))[tissue].mean())


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def tissue_metrics(before: np.ndarray, after: np.ndarray, tissue: np.ndarray, *, window: int = 32,
                   roi_a=None, roi_b=None) -> dict:
    """Every figure above for one frame; None where undefined. ValueError when a box does not
    fit the image or holds fewer than 2 tissue pixels."""
    row: dict = {"tissue_pixels": int(tissue.sum())}
    if not tissue.any():
        return row
    pair = torch.from_numpy(np.stack([before, after]).astype(np.float64))
    box = tissue_window(before, tissue, window)
    row["window"] = None if box is None else [int(b) for b in box]
    for name, fn in (("snr", speckle_snr), ("enl", enl)):
        values = fn(pair, tuple(box)).tolist() if box is not None else [None, None]
        row[f"{name}_before"], row[f"{name}_after"] = (None if v is None else _finite(v) for v in values)
    row["edge_preservation"] = edge_preservation(before, after, tissue)
    row["local_mean_change"] = local_mean_change(before, after, tissue)
    if roi_a is not None and roi_b is not None:
        from speckle_models.metrics.speckle_stats import box_mask

        masks = []
        for label, roi in (("--roi-a", roi_a), ("--roi-b", roi_b)):
            try:
                m = box_mask(before.shape, tuple(int(r) for r in roi)).numpy() & tissue
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from e
            if m.sum() < 2:
                raise ValueError(f"{label} {tuple(roi)} holds {int(m.sum())} tissue pixel(s); "
                                 "the metrics are measured inside the tissue only")
            masks.append(torch.from_numpy(m))
        bins = rice_bins(int(masks[0].sum() + masks[1].sum()))
        row["gcnr_bins"] = bins
        for name, values in (("cnr", cnr(pair, *masks)), ("gcnr", gcnr(pair, *masks, bins=bins))):
            row[f"{name}_before"], row[f"{name}_after"] = (_finite(v) for v in values.tolist())
    return row
