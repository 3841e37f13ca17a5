"""Self-supervised despeckling: training on speckled images alone (speckle-train --target
self-supervised), with the speckle's correlation measured on the data.

Why plain Noise2Void / Neighbor2Neighbor fail on speckle: they assume a pixel's noise is
independent of its neighbours', so the best prediction of a hidden pixel from its neighbours
is its clean value. Speckle is correlated over the resolution cell: a pixel's neighbours
carry its speckle, and a network that sees them learns to reproduce the speckle. Both methods
here first measure how far the correlation reaches and then never let the network see a
correlated neighbour of a pixel it is scored on.

The correlation (`measure_correlation`): residual r = y - G_6 * y of each image (its local
mean removed), over valid pixels m (neither black nor saturated); normalized autocorrelation
rho(dz, dx) = sum m r m' r' / sum m m' / rho(0, 0) over all images (FFT, zero-padded, so no
wrap-around), for lags |dz|, |dx| <= MAX_LAG (fewer if the images are small). Tissue texture
(layers, fibres) adds a floor f along an axis: the least rho over its lags, taken when positive,
below FLOOR_MAX and flat at the end (the last two lags within FLAT_TAIL), else 0; it is removed
as rho' = (rho - f) / (1 - f) (on GE's lymph-node frame, fibres hold lateral rho at 0.18-0.21
from 10 to 16 px). The decorrelation length along an axis is the smallest lag l >= 1 with
rho' <= THRESHOLD (0.1); the footprint F is the set of lags with rho' > THRESHOLD (f the
larger floor) inside the (2 L_z - 1) x (2 L_x - 1) box (the pixels "correlated with" the centre).
The FWHM (twice the lag where rho falls to 0.5) is reported too. For a Gaussian-filtered white
field of filter sigma s, rho(l) = exp(-l^2 / (4 s^2)) and L = the first integer above
2 s sqrt(ln 10) = 3.03 s (tests/test_self_supervised.py).

(a) "blind-spot" (structured blind spot, after Broaddus et al., ISBI 2020, with the mask sized
    from the measured footprint): seed pixels drawn at rate rho_s; hidden H = seeds dilated by
    F (+) F; scored pixels S = pixels with no visible pixel inside their own footprint (the
    seeds' F-neighbourhoods at least). Hidden pixels are filled from visible pixels only: the
    normalized-convolution local mean m (Gaussian sigma = (L_z, L_x)) plus the speckle residual
    y - m of visible pixels displaced by more than a blob (`BlindSpot.fill`), so a hidden blob
    looks like speckle. Loss: mean over S of (f(y_masked) - y)^2. Every input value a scored
    pixel's prediction can use comes from pixels at lags outside F, where the speckle is
    decorrelated (rho <= 0.1): the minimiser is E[y_p | decorrelated context], the speckle's
    local mean, which is what the phantom's speckle-free target is (phantom.py). rho_s is set
    so that HIDDEN_FRACTION of the pixels are hidden. Both choices were measured (docs/
    self_supervised.md): with a smooth fill (m alone) the network learns to smooth fills and
    not speckle, and at inference, where nothing is hidden, it makes the image worse; 30%
    hidden scored best of 8, 15, 30 and 45%.
(b) "neighbor2neighbor" (Huang et al., CVPR 2021, with stride): cells of (L_z + 1) x (L_x + 1)
    pixels; in each cell a random pair (p, q) of positions whose lag is outside F; g1(y) and
    g2(y) are the sub-images of the p's and the q's. Loss (N2N's eq. 7, gamma = GAMMA):
    |f(g1 y) - g2 y|^2 + gamma |f(g1 y) - g2 y - (g1 f(y) - g2 f(y))|^2, f(y) without gradient.
    The sub-images' pixels are >= L apart, so their speckle is nearly white: the network
    learns at 1 / (L + 1) of the scale it is used at. `subsampled_forward` is the matching
    inference (pixel-unshuffle, denoise every phase, shuffle back) for the comparison.

The measured comparison on the phantom and the default: docs/self_supervised.md.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from speckle_models.metrics.smoothing import gaussian_blur, masked_blur

METHODS = ("blind-spot", "neighbor2neighbor")
DEFAULT_METHOD = "blind-spot"         # the measured winner: docs/self_supervised.md
THRESHOLD = 0.1
MAX_LAG = 16                                 # scanner frames reach 6-11 px laterally (docs)
MIN_LAG = 4
FLOOR_MAX = 0.5
DETREND_SIGMA = 6.0
HIDDEN_FRACTION = 0.3
GAMMA = 1.0
VALID_LOW, VALID_HIGH = 2 / 255, 253 / 255   # black and saturated pixels carry no speckle
FLAT_TAIL = 0.02
ACF_IMAGES = 64                              # images the correlation is measured on, at most


@dataclass(frozen=True)
class SpeckleCorrelation:
    """Decorrelation lengths (pixels), FWHMs, and the footprint (lags with rho > THRESHOLD,
    as rows of 0/1, centre in the middle)."""
    axial: int
    lateral: int
    axial_fwhm: float
    lateral_fwhm: float
    footprint: tuple

    def as_dict(self) -> dict:
        d = asdict(self)
        d["footprint"] = ["".join("#" if v else "." for v in row) for row in self.footprint]
        return d

    def footprint_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.footprint, dtype=torch.float32, device=device)


def speckle_autocorrelation(images: torch.Tensor, *, max_lag: int = MAX_LAG) -> torch.Tensor:
    """Normalized autocorrelation (2 max_lag + 1, 2 max_lag + 1) float64 of the speckle
    residual of (N, 1, H, W) images, v in [0, 1] (uint8 is divided by 255)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(images.shape)}")
    max_lag = min(max_lag, (min(images.shape[-2:]) - 1) // 2)     # what the images hold
    if max_lag < MIN_LAG:
        raise ValueError(f"images of {tuple(images.shape[-2:])} are too small to measure the speckle "
                         f"correlation (need at least {2 * MIN_LAG + 1} px a side)")
    v = images[:ACF_IMAGES].double()
    if images.dtype == torch.uint8:
        v = v / 255.0
    valid = ((v > VALID_LOW) & (v < VALID_HIGH)).double()
    r = (v - gaussian_blur(v, DETREND_SIGMA)) * valid
    h, w = v.shape[-2:]
    size = (h + max_lag, w + max_lag)            # zero padding: no circular wrap within max_lag

    def corr(a):
        fa = torch.fft.rfft2(a[:, 0], s=size)
        c = torch.fft.irfft2(fa * fa.conj(), s=size).sum(0)
        return torch.fft.fftshift(c)[size[0] // 2 - max_lag: size[0] // 2 + max_lag + 1,
                                     size[1] // 2 - max_lag: size[1] // 2 + max_lag + 1]

    pairs = corr(valid)
    if float(pairs[max_lag, max_lag]) < 100:
        raise ValueError("too few non-black, non-saturated pixels to measure the speckle correlation")
    acf = corr(r) / pairs.clamp_min(1.0)
    return acf / acf[max_lag, max_lag]


def _length(profile: torch.Tensor, threshold: float, what: str) -> tuple[int, float]:
    """(first lag >= 1 with rho <= threshold, FWHM) of a one-sided profile rho(0..max_lag)."""
    below = (profile[1:] <= threshold).nonzero()
    if below.numel() == 0:
        raise ValueError(f"the speckle stays correlated beyond {profile.numel() - 1} px {what} "
                         f"(rho = {float(profile[-1]):.2f}): are these speckle images at this scale?")
    length = int(below[0]) + 1
    half = (profile <= 0.5).nonzero()
    k = int(half[0])
    fwhm = 2 * ((k - 1) + (float(profile[k - 1]) - 0.5) / float(profile[k - 1] - profile[k]))
    return length, fwhm


def _floored(profile: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(rho' = (rho - f) / (1 - f), f) with f = max(0, min rho over the lags) when the profile's
    tail is flat (its last two lags within FLAT_TAIL), else f = 0: texture of the anatomy along
    an axis (layers, fibres) adds a floor that is not speckle; a tail still falling is."""
    tail_flat = abs(float(profile[-2] - profile[-1])) < FLAT_TAIL
    f = max(0.0, float(profile[1:].min())) if tail_flat else 0.0
    f = f if f < FLOOR_MAX else 0.0          # a floor that high is the structure, not a floor
    return (profile - f) / (1 - f), f


def correlation_from_acf(acf: torch.Tensor, threshold: float = THRESHOLD) -> SpeckleCorrelation:
    """Lengths, FWHMs and footprint of a normalized autocorrelation (centre in the middle)."""
    c = acf.shape[0] // 2
    pz, fz0 = _floored(acf[c:, c])
    px, fx0 = _floored(acf[c, c:])
    lz, fz = _length(pz, threshold, "axially (along H)")
    lx, fx = _length(px, threshold, "laterally (along W)")
    floor = max(fz0, fx0)
    box = acf[c - lz + 1:c + lz, c - lx + 1:c + lx] > floor + threshold * (1 - floor)
    box[lz - 1, lx - 1] = True
    box = box | box.flip(0).flip(1)                          # the autocorrelation is symmetric
    return SpeckleCorrelation(lz, lx, fz, fx, tuple(tuple(bool(v) for v in row) for row in box.tolist()))


def measure_correlation(images: torch.Tensor, threshold: float = THRESHOLD) -> SpeckleCorrelation:
    """The speckle's decorrelation lengths and footprint, measured on the images."""
    return correlation_from_acf(speckle_autocorrelation(images), threshold)


def _dilate(mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.to(mask.device, torch.float32)[None, None]
    return F.conv2d(mask.float(), k, padding=(k.shape[-2] // 2, k.shape[-1] // 2)) > 0.5


class BlindSpot:
    """Method (a): the structured blind spot sized by the footprint (module docstring)."""

    name = "blind-spot"

    def __init__(self, corr: SpeckleCorrelation, hidden_fraction: float = HIDDEN_FRACTION,
                 texture: str = "speckle"):
        if not 0 < hidden_fraction < 1:
            raise ValueError(f"hidden_fraction must be in (0, 1), got {hidden_fraction}")
        if texture not in ("speckle", "mean"):
            raise ValueError(f"texture must be 'speckle' or 'mean', got {texture!r}")
        self.corr, self.texture = corr, texture
        fp = corr.footprint_tensor()
        self.footprint = fp
        pad = (fp.shape[0] // 2, fp.shape[1] // 2)
        self.double = (F.conv2d(F.pad(fp, (pad[1],) * 2 + (pad[0],) * 2)[None, None],
                                fp[None, None], padding=pad)[0, 0] > 0.5).float()   # F (+) F
        self.rate = hidden_fraction / float(self.double.sum())
        self.sigma = (float(corr.axial), float(corr.lateral))

    def masks(self, shape, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, scored) boolean (N, 1, H, W) masks."""
        seeds = torch.rand(shape, device=device, generator=generator) < self.rate
        hidden = _dilate(seeds, self.double)
        scored = ~_dilate(~hidden, self.footprint)
        return hidden, scored

    def fill(self, y: torch.Tensor, hidden: torch.Tensor, generator=None) -> torch.Tensor:
        """Values for the hidden pixels made of visible ones only: the masked local mean m, plus
        (texture="speckle") the speckle residual y - m of visible pixels displaced by d, at
        least the hidden blobs' size away in both axes (random sign and length, one d a batch):
        the fill then looks like speckle, so the network cannot tell hidden from visible pixels
        and learns one function for both (with a smooth fill it learns to smooth fills only)."""
        visible = (~hidden).float()
        mean = masked_blur(y, visible, self.sigma)
        if self.texture == "mean":
            return mean
        size = self.double.shape
        d = [int(torch.randint(s, 2 * s + 1, (), generator=generator, device=y.device))
             * (1 if bool(torch.rand((), generator=generator, device=y.device) < 0.5) else -1) for s in size]
        return mean + torch.roll((y - mean) * visible, shifts=d, dims=(-2, -1))

    def __call__(self, forward, y: torch.Tensor, generator=None) -> torch.Tensor:
        hidden, scored = self.masks(y.shape, y.device, generator)
        yf = y.float()
        pred = forward(torch.where(hidden, self.fill(yf, hidden, generator), yf).to(y.dtype)).float()
        w = scored.float()
        return ((pred - yf).square() * w).sum() / w.sum().clamp_min(1.0)


class StridedNeighbor2Neighbor:
    """Method (b): Neighbor2Neighbor on cells of (L_z + 1) x (L_x + 1) (module docstring)."""

    name = "neighbor2neighbor"

    def __init__(self, corr: SpeckleCorrelation, gamma: float = GAMMA):
        self.corr, self.gamma = corr, float(gamma)
        self.stride = (corr.axial + 1, corr.lateral + 1)
        sz, sx = self.stride
        fp = corr.footprint
        cz, cx = len(fp) // 2, len(fp[0]) // 2

        def correlated(dz, dx):
            return abs(dz) <= cz and abs(dx) <= cx and fp[cz + dz][cx + dx]

        cells = list(itertools.product(range(sz), range(sx)))
        pairs = [(a[0] * sx + a[1], b[0] * sx + b[1]) for a, b in itertools.permutations(cells, 2)
                 if not correlated(b[0] - a[0], b[1] - a[1])]
        if not pairs:
            raise ValueError(f"no decorrelated pair fits a {sz}x{sx} cell")
        self.pairs = torch.tensor(pairs, dtype=torch.long)        # (P, 2) positions in a cell

    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        sz, sx = self.stride
        n, c, h, w = x.shape
        hc, wc = h // sz, w // sx
        x = x[..., :hc * sz, :wc * sx].reshape(n, c, hc, sz, wc, sx)
        return x.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hc, wc, sz * sx)

    def sample(self, x: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g1 x, g2 x) for per-cell pair indices `choice` (N, 1, Hc, Wc)."""
        cells = self._cells(x)
        idx = self.pairs.to(x.device)[choice]                     # (N, 1, Hc, Wc, 2)
        return cells.gather(-1, idx[..., :1]).squeeze(-1), cells.gather(-1, idx[..., 1:]).squeeze(-1)

    def __call__(self, forward, y: torch.Tensor, generator=None) -> torch.Tensor:
        sz, sx = self.stride
        n, c, h, w = y.shape
        if h < 2 * sz or w < 2 * sx:
            raise ValueError(f"images of {h}x{w} are too small for {sz}x{sx} cells")
        choice = torch.randint(len(self.pairs), (n, c, h // sz, w // sx), device=y.device,
                               generator=generator)
        with torch.no_grad():
            fy = forward(y).float()
        g1, g2 = self.sample(y.float(), choice)
        f1, f2 = self.sample(fy, choice)
        diff = forward(g1.to(y.dtype)).float() - g2
        return diff.square().mean() + self.gamma * (diff - (f1 - f2)).square().mean()


def subsampled_forward(model, y: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Denoise each of the sz x sx polyphase sub-images of y (N, 1, H, W) and interleave them
    back: the inference that matches (b)'s training scale. H, W are cropped to multiples."""
    sz, sx = stride
    n, c, h, w = y.shape
    hc, wc = h // sz, w // sx
    x = y[..., :hc * sz, :wc * sx].reshape(n, c, hc, sz, wc, sx).permute(0, 3, 5, 1, 2, 4)
    out = model(x.reshape(n * sz * sx, c, hc, wc)).reshape(n, sz, sx, c, hc, wc)
    return out.permute(0, 3, 4, 1, 5, 2).reshape(n, c, hc * sz, wc * sx)


def make_objective(method: str, corr: SpeckleCorrelation):
    if method == "blind-spot":
        return BlindSpot(corr)
    if method == "neighbor2neighbor":
        return StridedNeighbor2Neighbor(corr)
    raise ValueError(f"unknown self-supervised method {method!r}; expected one of {', '.join(METHODS)}")


def parse_correlation(text: str) -> tuple[int, int]:
    """'AXIAL,LATERAL' (pixels, ints >= 1) for --correlation-length."""
    try:
        az, ax = (int(v) for v in text.split(","))
    except ValueError:
        az = ax = 0
    if az < 1 or ax < 1:
        raise ValueError(f"--correlation-length takes AXIAL,LATERAL (ints >= 1), got {text!r}")
    return az, ax


def box_correlation(axial: int, lateral: int) -> SpeckleCorrelation:
    """A correlation given by its lengths alone (--correlation-length): a full box footprint."""
    fp = tuple(tuple(True for _ in range(2 * lateral - 1)) for _ in range(2 * axial - 1))
    return SpeckleCorrelation(axial, lateral, math.nan, math.nan, fp)


# ----------------------------------------------------------------------------- the training loop's side

def without_maps(data):
    """The data with its speckle-free maps dropped: a self-supervised run cannot read them."""
    import dataclasses

    return dataclasses.replace(data, train_clean=None, val_clean=None, test_clean=None)


def prepare(data, config):
    """(data without maps, the objective, its SpeckleCorrelation) of a self-supervised run:
    the correlation measured on the training images unless config.correlation gives it."""
    data = without_maps(data)
    if config.correlation is not None:
        corr = box_correlation(*config.correlation)
    else:
        corr = measure_correlation(data.train)
    return data, make_objective(config.ss_method, corr), corr


def describe(corr: SpeckleCorrelation) -> str:
    text = f"speckle decorrelation length {corr.axial} px axially, {corr.lateral} px laterally"
    if math.isfinite(corr.axial_fwhm):
        text += f" (autocorrelation FWHM {corr.axial_fwhm:.2f} x {corr.lateral_fwhm:.2f} px)"
    return text + f"; blind footprint {len(corr.footprint)}x{len(corr.footprint[0])}"


@torch.no_grad()
def validation_loss(objective, model, noisy: torch.Tensor, *, batch_size: int, amp: bool,
                    seed: int) -> float:
    """The objective on the validation images in eval mode, with masks from a generator
    seeded with `seed`: the same masks every epoch, so epochs compare."""
    was_training = model.training
    model.eval()
    g = torch.Generator(device=noisy.device).manual_seed(seed)

    def forward(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            return model(x)

    total = 0.0
    try:
        for i in range(0, noisy.shape[0], batch_size):
            x = noisy[i:i + batch_size]
            total += float(objective(forward, x, g)) * x.shape[0]
    finally:
        model.train(was_training)
    return total / noisy.shape[0]
