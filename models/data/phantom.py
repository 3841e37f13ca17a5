"""A synthetic B-mode ultrasound phantom with physically made speckle (the built-in data set).

The Kaggle "Ultrasound Nerve Segmentation" images cannot be downloaded here, so the package
makes look-alikes of the same count and size. Each image is simulated, not drawn:

1. Anatomy: an echogenicity map e(z, x) in [0, 1] (z depth, x lateral) per image, from random
   parameters: a bright skin line, tissue layers with wavy tilted interfaces, bright fascia
   lines along them, striated muscle texture, and round sections: anechoic vessels (dark,
   thin bright wall, brighter band below them, the posterior acoustic enhancement) and
   hypoechoic nerves (dark core with fascicles, bright epineurium rim); depth attenuation.
   Reflectivity (mean backscattered intensity) is R = 10^(MAP_DB * (e - 1) / 10): e = 1 is
   0 dB, e = 0 is -MAP_DB.
2. Scatterers on a grid FINE times finer than the output: a scatterer sits in a cell with
   probability d = 0.1 + 0.9 e (density) and has a Gaussian amplitude of variance R / d, so the
   mean intensity is R whatever the density (sparse scatterers: less developed speckle).
3. Pulse-echo point-spread function: a Gaussian-modulated cosine along depth (centre
   frequency F0 cycles per fine pixel, envelope SIGMA_AXIAL) times a Gaussian across
   (SIGMA_LATERAL). The convolution and the envelope detection are one step along depth: the
   one-sided spectrum of the scatterers times the pulse spectrum, inverse FFT -> analytic
   signal (Hilbert transform); lateral convolution by a short Gaussian filter.
4. Envelope |analytic signal|, log compression to DISPLAY_DB of dynamic range, 8 bits, then an
   area average FINE x FINE down to the output grid (the antialiasing of a resize).

With many scatterers per resolution cell the envelope is Rayleigh distributed (fully developed
speckle; the tests check it). The speckle-free target returned with each image is the same
pipeline applied to the local mean intensity (R blurred by the PSF's intensity profile), less
the mean log of a Rayleigh variable (2.51 dB), so it is the expected gray level of the speckled
image where it is not clipped. Everything is batched torch on CPU, in chunks of CHUNK images
(about 0.1 GB of temporaries each); a chunk's generator is seeded from (seed, chunk index), so a
data set is reproducible for a given (seed, count).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PHANTOM_VERSION = 2       # bump when the output changes: it is part of the cache key
FINE = 1                  # the simulation grid is FINE x finer than the output along depth
MARGIN = 6                # output pixels simulated around the image, cropped (FFT wrap, edges)
CHUNK = 64                # images per batch of work
MAP_DB = 45.0             # reflectivity range of the echogenicity map
DISPLAY_DB = 55.0         # displayed dynamic range; the top is TOP_DB above a 0 dB reflector
TOP_DB = 10.0
F0 = 0.25                 # pulse centre frequency, cycles per simulation pixel along depth
SIGMA_AXIAL = 0.8         # pulse envelope (simulation pixels, standard deviation) along depth
SIGMA_LATERAL = 1.4       # beam width (output pixels, standard deviation) across
RAYLEIGH_LOG_BIAS_DB = 10.0 * 0.5772156649015329 / math.log(10.0)   # E[10 log10 |A|^2 / P] = -2.51 dB
_ROUND_SLOTS = 3          # round sections per image (each present with some probability)


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def echogenicity_maps(count: int, height: int, width: int, generator: torch.Generator,
                      *, margin: int = 0) -> torch.Tensor:
    """Random anatomical echogenicity maps, (count, height + 2 margin, width + 2 margin) float32
    in [0, 1]. The margin extends the same anatomy beyond the image (coordinates outside
    [0, 1]). Written with broadcasting: terms in one coordinate are (n, H, 1) or (n, 1, W) and
    only their combinations are full size, which keeps the map cheap next to the simulation."""
    n = count
    p = torch.rand(n, 32, generator=generator)
    col = iter(range(32))

    def param(low, high):
        return _uniform(p[:, next(col)], low, high).view(n, 1, 1)

    z = ((torch.arange(height + 2 * margin, dtype=torch.float32) - margin + 0.5) / height).view(1, -1, 1)
    x = ((torch.arange(width + 2 * margin, dtype=torch.float32) - margin + 0.5) / width).view(1, 1, -1)

    # tissue layers under the skin: 3 interfaces with depth, tilt and a gentle wave
    depths = torch.sort(torch.rand(n, 3, generator=generator) * 0.7 + 0.15, dim=1).values
    levels = torch.rand(n, 4, generator=generator) * 0.35 + 0.45        # layer echogenicity
    interfaces = []
    e = levels[:, 0].view(n, 1, 1).expand(n, z.shape[1], x.shape[2])
    for k in range(3):
        wave = param(0.0, 0.04) * torch.sin(2 * math.pi * (param(0.5, 2.0) * x + param(0, 1)))
        s = depths[:, k].view(n, 1, 1) + param(-0.15, 0.15) * (x - 0.5) + wave   # (n, 1, W)
        interfaces.append(s)
        step = (levels[:, k + 1] - levels[:, k]).view(n, 1, 1)
        e = e + step * (z > s)
    # striated muscle / fibrous texture along the layers: sin(a z + b x + c), split in products
    phase_z = 2 * math.pi * (param(12, 30) * z + param(0, 1))
    phase_x = 2 * math.pi * param(-3, 3) * x
    stripes = torch.sin(phase_z) * torch.cos(phase_x) + torch.cos(phase_z) * torch.sin(phase_x)
    e = e * (1 + param(0.0, 0.12) * stripes)
    # skin line and fascia lines
    skin = param(0.015, 0.04)
    e = e * torch.where(z < skin, 0.35, 1.0)
    e = torch.maximum(e, 0.95 * torch.exp(-0.5 * ((z - skin) / 0.006) ** 2))
    for s in interfaces:
        e = torch.maximum(e, param(0.85, 1.0) * torch.exp(-0.5 * ((z - s) / param(0.006, 0.012)) ** 2))

    # round sections: vessels (anechoic) or nerves (hypoechoic with fascicles and bright rim)
    shape = torch.rand(n, _ROUND_SLOTS, 6, generator=generator)
    for k in range(_ROUND_SLOTS):
        s = shape[:, k].view(n, 6, 1, 1).unbind(1)
        present = (s[0] < 0.75).float()
        vessel = (s[1] < 0.4).float()
        cx, cz = _uniform(s[2], 0.15, 0.85), _uniform(s[3], 0.3, 0.8)
        rx = _uniform(s[4], 0.05, 0.13)
        rz = rx * _uniform(s[5], 0.6, 1.0)
        r2 = ((x - cx) / rx) ** 2 + ((z - cz) / rz) ** 2            # squared elliptic radius
        inside = torch.sigmoid((1 - r2) / 0.08) * present           # edge ~ 0.04 in radius
        fascicles = torch.cos(2 * math.pi * 2.5 * (x - cx) / rx) * torch.cos(
            2 * math.pi * 2.5 * (z - cz) / rz)
        core = vessel * 0.03 + (1 - vessel) * (0.35 + 0.1 * fascicles)
        rim = torch.exp(-0.5 * ((r2 - 1) / 0.3) ** 2) * (present * (0.8 + 0.2 * (1 - vessel)))
        # posterior acoustic enhancement below a vessel (separable band)
        band = torch.sigmoid((z - cz) / 0.02) * (torch.sigmoid((rx - (x - cx).abs()) / 0.01)
                                                 * (0.25 * vessel * present))
        e = torch.maximum(torch.lerp(e * (1 + band), core, inside), rim)

    attenuation = torch.exp(-param(0.0, 0.6) * z.clamp(min=0))
    return (e * attenuation).clamp(0.0, 1.0)


def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) Gaussian filter as a banded matrix (zero outside): a matmul runs the
    separable blur of a whole batch far faster than conv1d on short rows."""
    t = torch.arange(size, dtype=torch.float32)
    half = math.ceil(3.5 * sigma)
    g = torch.exp(-0.5 * ((t.view(-1, 1) - t.view(1, -1)) / sigma) ** 2)
    g = g * ((t.view(-1, 1) - t.view(1, -1)).abs() <= half)
    norm = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / sigma) ** 2).sum()
    return g / norm


def _pulse_spectrum(depth: int) -> torch.Tensor:
    """Twice the one-sided spectrum of the Gaussian-modulated cosine pulse, length depth//2 + 1:
    multiplying an rfft by it and inverting with a full-length ifft gives the analytic signal."""
    f = torch.fft.rfftfreq(depth)
    sigma_f = 1.0 / (2 * math.pi * SIGMA_AXIAL)
    # sin^2(2 pi f) tapers the Gaussian to 0 at DC and at Nyquist: no DC cut (whose Hilbert
    # transform has long 1/t tails that would fill anechoic regions) and no aliasing.
    h = torch.exp(-0.5 * ((f - F0) / sigma_f) ** 2) * torch.sin(2 * math.pi * f) ** 2
    return 2.0 * h


def analytic_rf(scatterers: torch.Tensor) -> torch.Tensor:
    """Scatterer field (n, depth, lateral) -> complex analytic RF signal after the pulse-echo
    PSF, as (n, lateral, depth): one A-line per row."""
    lines = (scatterers @ _blur_matrix(scatterers.shape[2], SIGMA_LATERAL)).transpose(1, 2)
    depth = lines.shape[-1]
    spectrum = torch.fft.rfft(lines, dim=-1) * _pulse_spectrum(depth)
    return torch.fft.ifft(spectrum, n=depth, dim=-1)


def _psf_energy(depth: int = 64, width: int = 64) -> float:
    """E|A|^2 for unit-variance independent scatterers = the energy of the PSF's analytic form."""
    delta = torch.zeros(1, depth, width)
    delta[0, depth // 2, width // 2] = 1.0
    return float(analytic_rf(delta).abs().pow(2).sum())


def _reflectivity(echo: torch.Tensor) -> torch.Tensor:
    return torch.pow(10.0, (MAP_DB / 10.0) * (echo - 1.0))


def speckle_envelope(echo: torch.Tensor, generator: torch.Generator, *,
                     density_scale=1.0, reflectivity_scale=None) -> torch.Tensor:
    """Envelope |A| (n, depth, lateral) of the simulated echoes for echogenicity maps on the
    simulation grid, scaled so that a 0 dB reflector (e = 1) has E|A|^2 = 1.
    density_scale multiplies the scatterer density (a number or a broadcastable tensor: fewer
    scatterers, less developed speckle); reflectivity_scale multiplies the reflectivity (0:
    no scatterers at all, a truly anechoic region). realistic_phantom.py uses both."""
    density = (0.1 + 0.9 * echo) * density_scale
    reflectivity = _reflectivity(echo) if reflectivity_scale is None else _reflectivity(echo) * reflectivity_scale
    occupied = torch.rand(echo.shape, generator=generator) < density
    amplitude = torch.randn(echo.shape, generator=generator) * torch.sqrt(reflectivity / density.clamp(min=1e-6))
    scatterers = torch.where(occupied, amplitude, torch.zeros(()))
    envelope = analytic_rf(scatterers).abs().transpose(1, 2)
    return envelope * (1.0 / math.sqrt(_psf_energy()))


def mean_intensity(echo: torch.Tensor, axial_scale: float = 1.0, *, reflectivity_scale=None) -> torch.Tensor:
    """Local mean of |A|^2 (the scale of speckle_envelope's square) on echo's grid: the
    reflectivity blurred by the PSF's intensity profile (Gaussian, sigma / sqrt 2 each way).
    axial_scale: simulation pixels per pixel of `echo` along depth; reflectivity_scale as in
    speckle_envelope."""
    r = _reflectivity(echo) if reflectivity_scale is None else _reflectivity(echo) * reflectivity_scale
    r = r @ _blur_matrix(echo.shape[2], SIGMA_LATERAL / math.sqrt(2))
    return _blur_matrix(echo.shape[1], SIGMA_AXIAL / math.sqrt(2) / axial_scale) @ r


def log_compress(power_db: torch.Tensor) -> torch.Tensor:
    """Power in dB (0 dB = a unit reflector) -> gray level in [0, 255] (float)."""
    return ((power_db + DISPLAY_DB - TOP_DB) * (255.0 / DISPLAY_DB)).clamp(0.0, 255.0)


def _crop_u8(gray: torch.Tensor, margin: int) -> torch.Tensor:
    g = gray[:, margin:gray.shape[1] - margin, margin:gray.shape[2] - margin]
    return g.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


def phantom_chunk(count: int, image_size: int, generator: torch.Generator, *,
                  return_envelope: bool = False):
    """One batch of work: (images, clean) uint8 (count, 1, S, S) [, envelope on the simulation
    grid, margin included]. The anatomy is drawn on the output grid (with a margin) and
    upsampled FINE x along depth, where the pulse needs the finer sampling; the log-compressed
    image is averaged back FINE x FINE along depth."""
    m = MARGIN
    echo = echogenicity_maps(count, image_size, image_size, generator, margin=m)
    echo_fine = F.interpolate(echo.unsqueeze(1), scale_factor=(FINE, 1), mode="bilinear",
                              align_corners=False).squeeze(1)
    envelope = speckle_envelope(echo_fine, generator)
    gray = log_compress(20.0 * torch.log10(envelope.clamp(min=1e-12)))
    gray = F.avg_pool2d(gray.unsqueeze(1), (FINE, 1)).squeeze(1)
    images = _crop_u8(gray, m)
    mean_db = 10.0 * torch.log10(mean_intensity(echo, FINE).clamp(min=1e-12)) - RAYLEIGH_LOG_BIAS_DB
    clean = _crop_u8(log_compress(mean_db), m)
    if return_envelope:
        return images, clean, envelope
    return images, clean


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + chunk * 7919 + 12345) % (2 ** 63))


def generate_phantom(count: int, *, image_size: int = 128, seed: int = 0,
                     progress: bool = True, desc: str = "phantom"):
    """`count` phantom images and their speckle-free maps, both uint8 (count, 1, S, S)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    images = torch.empty(count, 1, image_size, image_size, dtype=torch.uint8)
    clean = torch.empty_like(images)
    starts = range(0, count, CHUNK)
    bar = None
    if progress and count > CHUNK:
        from tqdm.auto import tqdm
        bar = tqdm(total=count, desc=desc, unit="img")
    # The Gaussian tails of the anatomy underflow to subnormal floats, which the CPU handles
    # ~10x slower; flush them to zero while generating (torch has no getter: restored to off).
    torch.set_flush_denormal(True)
    try:
        for c, start in enumerate(starts):
            stop = min(count, start + CHUNK)
            images[start:stop], clean[start:stop] = phantom_chunk(
                stop - start, image_size, _chunk_generator(seed, c))
            if bar is not None:
                bar.update(stop - start)
    finally:
        torch.set_flush_denormal(False)
        if bar is not None:
            bar.close()
    return images, clean
