"""No-reference speckle metrics over image regions, batched on the tensor's device.

    speckle_snr(image, mask)      = mu / sigma                      (1.91 for fully developed
                                                                     speckle in the envelope)
    enl(image, mask)              = mu^2 / sigma^2                  (1 for single-look intensity)
    cnr(image, a, b)              = |mu_a - mu_b| / sqrt(sigma_a^2 + sigma_b^2)
    gcnr(image, a, b)             = 1 - sum_k min(p_a[k], p_b[k])   (Rodriguez-Molares et al.,
                                    IEEE TUFFC 2020: 1 - overlap of the regions' histograms)

Conventions:
- image: (N, H, W) or (N, 1, H, W), any real dtype; every function returns one value per image,
  shape (N,), float64 (float32 on MPS, which has no float64).
- A region is a boolean mask, (H, W) for every image or (N, H, W) (or (N, 1, H, W)) per image,
  or a box (top, left, height, width) (see `box_mask`). Masks are moved to the image's device.
- sigma is the sample standard deviation (ddof=1, so a region needs >= 2 pixels); the
  difference from ddof=0 is a factor 1 + O(1/n). Statistics use two passes (mean, then squared
  deviations), not E[x^2] - E[x]^2, which cancels for bright, low-contrast regions.
- A constant region gives sigma = 0 and so inf (or nan for 0 / 0): reported, not hidden.

gCNR binning (the choice the estimate depends on): per image, `bins` (default 256) equal bins
spanning [min, max] of the union of both regions, both histograms normalized to sum 1. This is
the authors' reference implementation (numpy.histogram of the concatenated samples with 256
bins); 256 is also the native resolution of the 8-bit images the networks see. Common bins over
the union make the two histograms comparable and cover both regions whatever their ranges. The
estimate is biased upward by sampling noise: for two regions drawn from one distribution,
E[gcnr] ~= sum_k sqrt(p_k / (pi n)) <= sqrt(bins / (pi n)) for n pixels per region (each bin's
count difference is ~ normal with variance 2 n p_k), so fewer bins suit small regions; more
bins reduce the (downward) discretization bias of well separated regions. Edges and bin
assignment follow numpy.histogram exactly (edges lo + k * (hi - lo) / bins, half-open bins,
the last one closed), so results match a numpy computation to rounding.

Adaptive bins (bins="rice", what speckle-reproduce uses): per image and region pair,
k = ceil(2 n^(1/3)) equal bins over the union's [min, max] (the Rice rule), n the pixel count
of the smaller region: the null bias bound sqrt(k / (pi n)) then falls as n^(-1/3) (0.24 for
n = 40, 0.11 for n = 400, 0.05 for n = 4000), where 256 fixed bins give a bound above 1 for
regions under ~80 pixels (two samples of one distribution then look separable). Bin j holds
lo + j w <= v < lo + (j + 1) w, w = (hi - lo) / k, the maximum in the last bin.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["box_mask", "region_stats", "speckle_snr", "enl", "cnr", "gcnr", "homogeneous_windows"]


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_images(image) -> torch.Tensor:
    """(N, H, W) view of `image` in the compute dtype."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.is_complex() or image.dtype == torch.bool:
        raise TypeError(f"image must be real-valued, got dtype {image.dtype}")
    if image.dim() == 4:
        if image.shape[1] != 1:
            raise ValueError(f"image of shape {tuple(image.shape)} has {image.shape[1]} channels; "
                             "expected (N, 1, H, W)")
        image = image[:, 0]
    elif image.dim() != 3:
        raise ValueError(f"image must be (N, H, W) or (N, 1, H, W), got shape {tuple(image.shape)}"
                         + (" (add a batch dimension: image[None])" if image.dim() == 2 else ""))
    if image.numel() == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    return image.to(_compute_dtype(image.device))


def box_mask(shape, top, left=None, height=None, width=None, *, device=None) -> torch.Tensor:
    """A boolean (H, W) mask, True on rows [top, top+height) and columns [left, left+width).

    Call as box_mask((H, W), top, left, height, width) or box_mask((H, W), (top, left, height,
    width)). The box must be non-empty and lie inside the image.
    """
    if left is None and height is None and width is None:
        box = top
        if not isinstance(box, (tuple, list)) or len(box) != 4:
            raise TypeError(f"box must be (top, left, height, width), got {box!r}")
        top, left, height, width = box
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (H, W), got {tuple(shape)}")
    h_img, w_img = (int(s) for s in shape)
    values = (top, left, height, width)
    if not all(isinstance(v, int) or (isinstance(v, torch.Tensor) and v.dim() == 0) for v in values) \
            or any(isinstance(v, bool) for v in values):
        raise TypeError(f"box (top, left, height, width) must be integers, got {values!r}")
    top, left, height, width = (int(v) for v in values)
    if height < 1 or width < 1:
        raise ValueError(f"box (top={top}, left={left}, height={height}, width={width}) is empty")
    if top < 0 or left < 0 or top + height > h_img or left + width > w_img:
        raise ValueError(f"box (top={top}, left={left}, height={height}, width={width}) does not fit "
                         f"in a {h_img}x{w_img} image")
    mask = torch.zeros(h_img, w_img, dtype=torch.bool, device=device)
    mask[top:top + height, left:left + width] = True
    return mask


def _as_mask(mask, images: torch.Tensor, name: str, min_pixels: int) -> torch.Tensor:
    """(N, H, W) boolean mask on the images' device, with >= min_pixels pixels in every image."""
    n, h, w = images.shape
    if isinstance(mask, (tuple, list)):
        mask = box_mask((h, w), tuple(mask), device=images.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean tensor or a (top, left, height, width) box, "
                        f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype} "
                        "(use mask > 0 or mask.bool() if that is what you mean)")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        if tuple(mask.shape) != (h, w):
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not match images of {h}x{w}")
        mask = mask.expand(n, h, w)
    elif mask.dim() == 3:
        if tuple(mask.shape) != (n, h, w):
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not match images of shape "
                             f"{(n, h, w)}")
    else:
        raise ValueError(f"{name} must be (H, W) or (N, H, W), got shape {tuple(mask.shape)}")
    mask = mask.to(images.device)
    counts = mask.flatten(1).sum(1)
    if bool((counts < min_pixels).any()):
        bad = (counts < min_pixels).nonzero().flatten().tolist()
        what = "is empty" if min_pixels == 1 else f"has fewer than {min_pixels} pixels"
        raise ValueError(f"{name} {what} in image(s) {bad[:10]} (pixel counts "
                         f"{counts[bad[:10]].tolist()})")
    return mask


def _stats(images: torch.Tensor, mask: torch.Tensor):
    """Per-image mean, sample variance (ddof=1) and pixel count over the mask (two passes)."""
    m = mask.to(images.dtype)
    count = m.flatten(1).sum(1)
    x = torch.where(mask, images, torch.zeros((), dtype=images.dtype, device=images.device))
    mean = x.flatten(1).sum(1) / count
    dev = torch.where(mask, images - mean.view(-1, 1, 1), torch.zeros((), dtype=images.dtype,
                                                                       device=images.device))
    var = dev.square().flatten(1).sum(1) / (count - 1)
    return mean, var, count


def region_stats(image, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, count) of each image over the region; std is the sample std (ddof=1)."""
    images = _as_images(image)
    mean, var, count = _stats(images, _as_mask(mask, images, "mask", 2))
    return mean, var.sqrt(), count


def speckle_snr(image, mask) -> torch.Tensor:
    """mu / sigma over the region: sqrt(pi / (4 - pi)) ~= 1.913 for a Rayleigh envelope."""
    images = _as_images(image)
    mean, var, _ = _stats(images, _as_mask(mask, images, "mask", 2))
    return mean / var.sqrt()


def enl(image, mask) -> torch.Tensor:
    """Equivalent number of looks mu^2 / sigma^2 over the region (of an intensity image: L for
    an L-look average of fully developed speckle)."""
    images = _as_images(image)
    mean, var, _ = _stats(images, _as_mask(mask, images, "mask", 2))
    return mean.square() / var


def cnr(image, mask_a, mask_b) -> torch.Tensor:
    """Contrast-to-noise ratio |mu_a - mu_b| / sqrt(sigma_a^2 + sigma_b^2) of two regions."""
    images = _as_images(image)
    mean_a, var_a, _ = _stats(images, _as_mask(mask_a, images, "mask_a", 2))
    mean_b, var_b, _ = _stats(images, _as_mask(mask_b, images, "mask_b", 2))
    return (mean_a - mean_b).abs() / (var_a + var_b).sqrt()


def rice_bins(n: int) -> int:
    """The Rice rule's bin count for a region pair whose smaller region has n pixels:
    ceil(2 n^(1/3)), at least 1 (module docstring); gcnr(bins="rice") uses it per image."""
    return max(1, math.ceil(2.0 * n ** (1.0 / 3.0) - 1e-9))


def gcnr(image, mask_a, mask_b, *, bins: int | str = 256) -> torch.Tensor:
    """Generalized CNR: 1 - overlap of the two regions' histograms (binning: module docstring;
    bins an int for fixed bins, or "rice" for the adaptive rule).

    0 for regions with the same distribution (up to the sampling bias described there), 1 for
    regions whose values do not share a bin.
    """
    rice = bins == "rice"
    if not rice and (not isinstance(bins, int) or isinstance(bins, bool) or bins < 1):
        raise ValueError(f"bins must be a positive int or 'rice', got {bins!r}")
    images = _as_images(image)
    ma = _as_mask(mask_a, images, "mask_a", 1)
    mb = _as_mask(mask_b, images, "mask_b", 1)
    n = images.shape[0]
    x = images.reshape(n, -1)
    union = (ma | mb).reshape(n, -1)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(union, x, inf).amin(1)
    hi = torch.where(union, x, -inf).amax(1)
    # numpy.histogram widens a zero-width range to [v - 0.5, v + 0.5]
    flat = lo == hi
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    wa = ma.reshape(n, -1).to(x.dtype)
    wb = mb.reshape(n, -1).to(x.dtype)
    if rice:
        smaller = torch.minimum(wa.sum(1), wb.sum(1))
        k = torch.ceil(2.0 * smaller ** (1.0 / 3.0) - 1e-9).clamp_min(1)
        width = int(k.max().item())
        pos = (x - lo.view(-1, 1)) / (hi - lo).view(-1, 1) * k.view(-1, 1)
        idx = torch.minimum(pos.floor().clamp_min(0), (k - 1).view(-1, 1)).long()
    else:
        width = bins
        # numpy.linspace's edges: k * step + lo, the last one exactly hi (two roundings, no fma)
        step = (hi - lo) / bins
        j = torch.arange(bins + 1, dtype=x.dtype, device=x.device)
        edges = j.view(1, -1) * step.view(-1, 1)
        edges = edges + lo.view(-1, 1)
        edges[:, -1] = hi
        # bin j holds edges[j] <= v < edges[j+1]; v == hi goes to the last bin (numpy's closed
        # end). Pixels outside both regions get clamped indices and weight 0.
        idx = (torch.searchsorted(edges.contiguous(), x.contiguous(), right=True) - 1).clamp_(0, bins - 1)
    idx = idx.clamp(0, width - 1)
    pa = torch.zeros(n, width, dtype=x.dtype, device=x.device).scatter_add_(1, idx, wa)
    pb = torch.zeros(n, width, dtype=x.dtype, device=x.device).scatter_add_(1, idx, wb)
    pa = pa / wa.sum(1, keepdim=True)
    pb = pb / wb.sum(1, keepdim=True)
    return 1.0 - torch.minimum(pa, pb).sum(1)


def homogeneous_windows(image, size, count: int = 1, *, by: str = "cv", return_boxes: bool = False,
                        within=None, min_mean: float | None = None):
    """The `count` most homogeneous, non-overlapping size x size windows of each image.

    by="cv": lowest local coefficient of variation sigma / mu (for envelope or intensity data,
    where fully developed speckle has a constant CV, so a low CV marks smooth tissue; windows
    with mu <= 0 are never chosen). by="std": lowest local sigma (for log-compressed data, where
    speckle has a constant sigma of ~5.57 dB instead). Windows are picked greedily, the best
    first, each excluding every window that overlaps it; greedy picks can leave unusable gaps,
    so fewer windows than a grid packing may fit (at least ceil(P / ((2h-1)(2w-1))) for P
    window positions).

    within: a boolean (H, W) or (N, H, W) mask the windows must lie in entirely (a tissue
    region); min_mean: windows whose mean is below it are never chosen (black areas, where a
    low std says nothing about speckle).

    Returns boolean masks of shape (count, N, H, W), best first, ready for the metrics (e.g.
    speckle_snr(image, masks[0])); with return_boxes=True also a (count, N, 4) int64 tensor of
    (top, left, height, width). Raises ValueError if fewer than `count` valid windows fit.
    min_mean: windows whose mean is not above it are never chosen (e.g. dark, clipped regions).
    """
    images = _as_images(image)
    n, h, w = images.shape
    wh, ww = (size, size) if isinstance(size, int) else tuple(size)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (wh, ww)) or min(wh, ww) < 2:
        raise ValueError(f"size must be an int or (height, width) of ints >= 2, got {size!r}")
    if wh > h or ww > w:
        raise ValueError(f"window {wh}x{ww} is larger than the {h}x{w} image")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if by not in ("cv", "std"):
        raise ValueError(f"by must be 'cv' or 'std', got {by!r}")
    # Local moments of every window position (stride 1); the mean is subtracted first so that
    # E[x^2] - E[x]^2 does not cancel on bright regions.
    x = images - images.flatten(1).mean(1).view(-1, 1, 1)
    area = wh * ww
    mean = F.avg_pool2d(x[:, None], (wh, ww), stride=1)[:, 0]
    var = (F.avg_pool2d(x[:, None].square(), (wh, ww), stride=1)[:, 0] - mean.square()).clamp_min(0)
    var = var * (area / (area - 1))  # ddof=1, as in the metrics
    mean = mean + images.flatten(1).mean(1).view(-1, 1, 1)
    score = var.sqrt()
    if by == "cv":
        score = torch.where(mean > 0, score / mean, torch.full_like(score, float("inf")))
    score = torch.nan_to_num(score, nan=float("inf"))
    if min_mean is not None:
        score = torch.where(mean >= min_mean, score, torch.full_like(score, float("inf")))
    if within is not None:
        inside = _as_mask(within, images, "within", 1).to(images.dtype)[:, None]
        full = F.avg_pool2d(inside, (wh, ww), stride=1)[:, 0] >= 1.0 - 0.5 / area
        score = torch.where(full, score, torch.full_like(score, float("inf")))
    ph, pw = score.shape[1:]
    rows = torch.arange(ph, device=score.device).view(1, -1, 1)
    cols = torch.arange(pw, device=score.device).view(1, 1, -1)
    img_rows = torch.arange(h, device=images.device).view(1, -1, 1)
    img_cols = torch.arange(w, device=images.device).view(1, 1, -1)
    masks, boxes = [], []
    for c in range(count):
        best, pos = score.flatten(1).min(1)
        if not bool(torch.isfinite(best).all()):
            bad = (~torch.isfinite(best)).nonzero().flatten().tolist()
            raise ValueError(f"only {c} valid non-overlapping {wh}x{ww} windows in image(s) {bad[:10]} "
                             f"(asked for {count})")
        top, left = pos // pw, pos % pw
        t, l = top.view(-1, 1, 1), left.view(-1, 1, 1)
        masks.append((img_rows >= t) & (img_rows < t + wh) & (img_cols >= l) & (img_cols < l + ww))
        boxes.append(torch.stack([top, left, torch.full_like(top, wh), torch.full_like(top, ww)], 1))
        # Windows overlapping the chosen one start less than a window away in both directions.
        overlap = ((rows - top.view(-1, 1, 1)).abs() < wh) & ((cols - left.view(-1, 1, 1)).abs() < ww)
        score = score.masked_fill(overlap, float("inf"))
    masks = torch.stack(masks)
    return (masks, torch.stack(boxes)) if return_boxes else masks
