"""Edge preservation against a reference image, on a region of known boundaries.

    pratt_fom(image, ideal, band)      Pratt's figure of merit (Abdou & Pratt 1979)
    beta(image, reference, mask)       Sattar et al.'s beta (1997): correlation of Laplacians
    canny_edges(image, band)           the edge detector both use for FOM

Pratt's figure of merit, per image:

    FOM = 1 / max(N_I, N_D) * sum over detected edge pixels k of 1 / (1 + ALPHA d_k^2)

N_I ideal edge pixels, N_D detected ones, d_k the Euclidean distance (pixels) from detected
pixel k to the nearest ideal edge pixel, ALPHA = 1/9 (Pratt's constant). FOM = 1 when the
detected edges are the ideal ones; missed edges (N_D < N_I) and false ones (N_D > N_I, e.g.
speckle) lower it, and so do displaced ones. Both edge maps come from one detector, Canny
(skimage.feature.canny) with CANNY_SIGMA and *absolute* hysteresis thresholds on gray levels
in [0, 1] (CANNY_LOW, CANNY_HIGH): a filter that lowers the contrast of an edge (a grey veil)
loses it, one that blurs it moves or drops it, one that leaves speckle adds false edges. Only
pixels inside `band` count, on both maps (the phantom's known boundaries, widened:
phantom_regions.edge_band). An image whose band holds no ideal edge gives NaN.

beta = sum (L - mean L)(L_ref - mean L_ref) / sqrt(sum (L - mean L)^2 sum (L_ref - mean L_ref)^2)
over the mask, L the 3 x 3 Laplacian (4-neighbour) of the image and L_ref of the reference
(replicate borders): 1 when the image's fine structure is the reference's up to a scale.
It is blind to contrast (a scale) and so pairs with PSNR; a blur lowers it (wider, weaker
Laplacians), leftover speckle too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ALPHA = 1.0 / 9.0
CANNY_SIGMA = 2.0
CANNY_LOW = 0.04
CANNY_HIGH = 0.08


def _stack(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().double().numpy()
    a = np.asarray(image, dtype=np.float64)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W) images, got shape {a.shape}")
    return a


def _masks(mask, shape) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    m = m.astype(bool)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != tuple(shape):
        raise ValueError(f"mask of shape {m.shape} does not match images of shape {tuple(shape)}")
    return m


def canny_edges(image, band=None, *, sigma: float = CANNY_SIGMA, low: float = CANNY_LOW,
                high: float = CANNY_HIGH) -> np.ndarray:
    """(N, H, W) boolean Canny edge maps of images in [0, 1], restricted to band if given."""
    from skimage.feature import canny

    imgs = _stack(image)
    edges = np.stack([canny(img, sigma=sigma, low_threshold=low, high_threshold=high)
                      for img in imgs]) if len(imgs) else np.zeros(imgs.shape, bool)
    if band is not None:
        edges &= _masks(band, imgs.shape)
    return edges


def pratt_fom(image, ideal, band, *, alpha: float = ALPHA, **canny_kw) -> np.ndarray:
    """(N,) float64 Pratt's figure of merit of each image's Canny edges in `band` against the
    boolean `ideal` edge maps (already restricted to the band); NaN where ideal is empty."""
    from scipy.ndimage import distance_transform_edt

    imgs = _stack(image)
    ideal = _masks(ideal, imgs.shape)
    detected = canny_edges(imgs, band, **canny_kw)
    out = np.full(len(imgs), np.nan)
    for i, (det, ide) in enumerate(zip(detected, ideal)):
        n_i = int(ide.sum())
        if n_i == 0:
            continue
        d = distance_transform_edt(~ide)[det]
        out[i] = float((1.0 / (1.0 + alpha * d * d)).sum()) / max(n_i, int(det.sum()))
    return out


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
    return F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), k.view(1, 1, 3, 3))[:, 0]


def beta(image, reference, mask) -> np.ndarray:
    """(N,) float64 Sattar's beta over the mask (module docstring); NaN where the mask has
    fewer than 2 pixels or a Laplacian is constant on it."""
    a = torch.from_numpy(_stack(image))
    b = torch.from_numpy(_stack(reference))
    if a.shape != b.shape:
        raise ValueError(f"image {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape")
    m = torch.from_numpy(_masks(mask, tuple(a.shape))).double()
    la, lb = _laplacian(a), _laplacian(b)
    count = m.flatten(1).sum(1)
    da = (la - ((la * m).flatten(1).sum(1) / count).view(-1, 1, 1)) * m
    db = (lb - ((lb * m).flatten(1).sum(1) / count).view(-1, 1, 1)) * m
    num = (da * db).flatten(1).sum(1)
    den = (da.square().flatten(1).sum(1) * db.square().flatten(1).sum(1)).sqrt()
    out = torch.where((count >= 2) & (den > 0), num / den, torch.full_like(num, float("nan")))
    return out.numpy()
