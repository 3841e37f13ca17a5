"""A synthetic B-mode ultrasound phantom with physically made speckle (the built-in data set).

The Kaggle "Ultrasound Nerve Segmentation" images cannot be downloaded here, so the package
makes look-alikes of the same count and size. Each image is simulated, not drawn:

1. Anatomy: an echogenicity map e(z, x) in [0, 1] (z depth, x lateral) per image, from random
   parameters: a bright skin line, tissue layers with wavy tilted interfaces, bright fascia
   lines along them, striated muscle texture, and round sections: anechoic vessels (dark,
   thin bright wall, brighter band below them, the posterior acoustic enhancement) and
   hypoechoic nerves (dark core with fascicles, bright epineurium rim); depth attenuation.
   Reflectivity (mean backscattered intensity) is R = 10^(MAP_DB * (e - 1) / 10): e = 1 is
   0 dB, e = 0 is -MAP_DB. The parameters come back as a geometry row per image
   (GEOMETRY_FIELDS; phantom_regions.py turns them into lesion masks and known boundaries).
2. Scatterers on a grid `fine` times finer than the output along depth (the map is upsampled
   bilinearly): a scatterer sits in a cell with probability d = 0.1 + 0.9 e (density) and has
   a Gaussian amplitude of variance R / d, so the mean intensity is R whatever the density
   (sparse scatterers: less developed speckle). Only depth is refined: the RF carrier runs
   along depth and needs several samples a cycle; across, the beam is a Gaussian of
   SIGMA_LATERAL = 1.4 output pixels, already smooth on the output grid.
3. Pulse-echo point-spread function: a Gaussian-modulated cosine along depth (centre
   frequency f0 cycles per fine pixel, envelope sigma_axial) times a Gaussian across. The
   convolution and the envelope detection are one step along depth: the one-sided spectrum of
   the scatterers times the pulse spectrum, inverse FFT -> analytic signal (Hilbert
   transform); lateral convolution by a short Gaussian filter. The spectrum is tapered to 0 at
   DC (a DC step's Hilbert transform has long 1/t tails that would fill anechoic regions).
4. Envelope |analytic signal|, log compression to DISPLAY_DB of dynamic range (gray levels
   clipped to [0, 255]), then an area average of `fine` fine pixels along depth down to the
   output grid (the antialiasing of a resize), rounded to 8 bits.

With many scatterers per resolution cell the envelope is Rayleigh distributed (fully developed
speckle; the tests check it). The speckle-free target is the *expected gray level* of the
speckled image (phantom_target.py, version 3): the local mean intensity (R blurred by the
pulse's own intensity profile |PSF|^2, computed from the tapered spectrum), the distribution
of the speckle about it at the local scatterer density (not only the fully developed -2.51 dB
of a Rayleigh envelope), and the display's clipping, all taken in expectation before the area
average. Everything is batched torch on CPU, in chunks of CHUNK images (about 0.2 GB of
temporaries each); a chunk's generator is seeded from (seed, chunk index), so a data set is
reproducible for a given (seed, count, version).

Versions (PHYSICS): 3 is the default. Version 2 is the phantom of the tables committed before
2026-12-03 (docs/figures/table2_*), kept bit for bit: no fine grid (fine = 1), a sin^2 taper
to 0 at DC and at the Nyquist frequency, and a target made of the Gaussian envelope's
intensity blur, a constant -2.51 dB and the display's clip of that mean (so not the expected
gray level where the speckle is sparse, where the floor clips, or where the taper reshapes the
pulse).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PHANTOM_VERSION = 3       # the default version; part of the cache key (bump for a new one)
MARGIN = 6                # output pixels simulated around the image, cropped (FFT wrap, edges)
CHUNK = 64                # images per batch of work
MAP_DB = 45.0             # reflectivity range of the echogenicity map
DISPLAY_DB = 55.0         # displayed dynamic range; the top is TOP_DB above a 0 dB reflector
TOP_DB = 10.0
SIGMA_LATERAL = 1.4       # beam width (output pixels, standard deviation) across
RAYLEIGH_LOG_BIAS_DB = 10.0 * 0.5772156649015329 / math.log(10.0)   # E[10 log10 |A|^2 / P] = -2.51 dB
_ROUND_SLOTS = 3          # round sections per image (each present with some probability)
# geometry row: 3 interface depths, tilts, wave amplitudes, wave frequencies, wave phases (15),
# the skin depth (1), then per round slot: present, vessel, cx, cz, rx, rz (18)
GEOMETRY_FIELDS = 34


@dataclass(frozen=True)
class Physics:
    """The simulation constants of one phantom version."""
    version: int
    fine: int             # simulation pixels per output pixel along depth
    f0: float             # pulse centre frequency, cycles per simulation pixel along depth
    sigma_axial: float    # pulse envelope (simulation pixels, standard deviation)
    taper: str            # "sin2": sin^2(2 pi f), 0 at DC and Nyquist; "dc": sin^2 below f0 only
    target: str           # "v2": Gaussian blur, -2.51 dB, clip; "expected": the expected gray level


# Version 3 keeps version 2's pulse in output pixels (0.25 cycles and 0.8 pixels) on a grid
# twice as fine, where its spectrum (to f0 + 3 sigma_f = 0.42 cycles per fine pixel) is below
# the Nyquist frequency, so only DC needs the taper.
PHYSICS = {2: Physics(2, fine=1, f0=0.25, sigma_axial=0.8, taper="sin2", target="v2"),
           3: Physics(3, fine=2, f0=0.125, sigma_axial=1.6, taper="dc", target="expected")}
FINE, F0, SIGMA_AXIAL = (PHYSICS[PHANTOM_VERSION].fine, PHYSICS[PHANTOM_VERSION].f0,
                         PHYSICS[PHANTOM_VERSION].sigma_axial)


def physics_of(version) -> Physics:
    if isinstance(version, Physics):
        return version
    if version not in PHYSICS:
        raise ValueError(f"unknown phantom version {version!r}; expected one of {sorted(PHYSICS)}")
    return PHYSICS[version]


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def echogenicity_maps(count: int, height: int, width: int, generator: torch.Generator,
                      *, margin: int = 0, return_geometry: bool = False):
    """Random anatomical echogenicity maps, (count, height + 2 margin, width + 2 margin) float32
    in [0, 1] [, and the (count, GEOMETRY_FIELDS) geometry rows]. The margin extends the same
    anatomy beyond the image (coordinates outside [0, 1]). Written with broadcasting: terms in
    one coordinate are (n, H, 1) or (n, 1, W) and only their combinations are full size, which
    keeps the map cheap next to the simulation."""
    n = count
    p = torch.rand(n, 32, generator=generator)
    col = iter(range(32))
    geo = {}

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
        amp, freq, phase = param(0.0, 0.04), param(0.5, 2.0), param(0, 1)
        wave = amp * torch.sin(2 * math.pi * (freq * x + phase))
        tilt = param(-0.15, 0.15)
        s = depths[:, k].view(n, 1, 1) + tilt * (x - 0.5) + wave   # (n, 1, W)
        geo[k] = (tilt, amp, freq, phase)
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
    rounds = []
    for k in range(_ROUND_SLOTS):
        s = shape[:, k].view(n, 6, 1, 1).unbind(1)
        present = (s[0] < 0.75).float()
        vessel = (s[1] < 0.4).float()
        cx, cz = _uniform(s[2], 0.15, 0.85), _uniform(s[3], 0.3, 0.8)
        rx = _uniform(s[4], 0.05, 0.13)
        rz = rx * _uniform(s[5], 0.6, 1.0)
        rounds.append((present, vessel, cx, cz, rx, rz))
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
    maps = (e * attenuation).clamp(0.0, 1.0)
    if not return_geometry:
        return maps
    cols = [depths] + [torch.cat([geo[k][j].view(n, 1) for k in range(3)], 1) for j in range(4)]
    cols.append(skin.view(n, 1))
    cols += [v.reshape(n, 1) for r in rounds for v in r]
    return maps, torch.cat(cols, 1)


def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) Gaussian filter as a banded matrix (zero outside): a matmul runs the
    separable blur of a whole batch far faster than conv1d on short rows."""
    t = torch.arange(size, dtype=torch.float32)
    half = math.ceil(3.5 * sigma)
    g = torch.exp(-0.5 * ((t.view(-1, 1) - t.view(1, -1)) / sigma) ** 2)
    g = g * ((t.view(-1, 1) - t.view(1, -1)).abs() <= half)
    norm = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / sigma) ** 2).sum()
    return g / norm


def pulse_spectrum(depth: int, physics: Physics) -> torch.Tensor:
    """Twice the one-sided spectrum of the pulse, length depth//2 + 1: multiplying an rfft by
    it and inverting with a full-length ifft gives the analytic signal."""
    f = torch.fft.rfftfreq(depth)
    sigma_f = 1.0 / (2 * math.pi * physics.sigma_axial)
    if physics.taper == "sin2":
        # sin^2(2 pi f) tapers the Gaussian to 0 at DC and at Nyquist (version 2)
        h = torch.exp(-0.5 * ((f - physics.f0) / sigma_f) ** 2) * torch.sin(2 * math.pi * f) ** 2
    else:
        # sin^2(pi f / (2 f0)) below f0, 1 above: 0 at DC, smooth (C^1) at f0
        taper = torch.where(f < physics.f0, torch.sin(math.pi * f / (2 * physics.f0)) ** 2, 1.0)
        h = torch.exp(-0.5 * ((f - physics.f0) / sigma_f) ** 2) * taper
    return 2.0 * h


def analytic_rf(scatterers: torch.Tensor, physics: Physics | int = PHANTOM_VERSION) -> torch.Tensor:
    """Scatterer field (n, depth, lateral) -> complex analytic RF signal after the pulse-echo
    PSF, as (n, lateral, depth): one A-line per row."""
    physics = physics_of(physics)
    lines = (scatterers @ _blur_matrix(scatterers.shape[2], SIGMA_LATERAL)).transpose(1, 2)
    depth = lines.shape[-1]
    spectrum = torch.fft.rfft(lines, dim=-1) * pulse_spectrum(depth, physics)
    return torch.fft.ifft(spectrum, n=depth, dim=-1)


def psf_energy(physics: Physics | int = PHANTOM_VERSION, depth: int = 64, width: int = 64) -> float:
    """E|A|^2 for unit-variance independent scatterers = the energy of the PSF's analytic form."""
    delta = torch.zeros(1, depth, width)
    delta[0, depth // 2, width // 2] = 1.0
    return float(analytic_rf(delta, physics).abs().pow(2).sum())


def reflectivity(echo: torch.Tensor) -> torch.Tensor:
    return torch.pow(10.0, (MAP_DB / 10.0) * (echo - 1.0))


def scatterer_density(echo: torch.Tensor) -> torch.Tensor:
    return 0.1 + 0.9 * echo


def speckle_envelope(echo: torch.Tensor, generator: torch.Generator,
                     physics: Physics | int = PHANTOM_VERSION, *, density_scale=1.0,
                     reflectivity_scale=None) -> torch.Tensor:
    """Envelope |A| (n, depth, lateral) of the simulated echoes for echogenicity maps on the
    simulation grid, scaled so that a 0 dB reflector (e = 1) has E|A|^2 = 1.
    density_scale multiplies the scatterer density (a number or a broadcastable tensor: fewer
    scatterers, less developed speckle); reflectivity_scale multiplies the reflectivity (0:
    no scatterers at all, a truly anechoic region). realistic_phantom.py uses both."""
    physics = physics_of(physics)
    density = scatterer_density(echo) * density_scale
    r = reflectivity(echo) if reflectivity_scale is None else reflectivity(echo) * reflectivity_scale
    occupied = torch.rand(echo.shape, generator=generator) < density
    amplitude = torch.randn(echo.shape, generator=generator) * torch.sqrt(r / density.clamp(min=1e-6))
    scatterers = torch.where(occupied, amplitude, torch.zeros(()))
    envelope = analytic_rf(scatterers, physics).abs().transpose(1, 2)
    return envelope * (1.0 / math.sqrt(psf_energy(physics)))


def mean_intensity(echo: torch.Tensor, axial_scale: float = 1.0,
                   physics: Physics | int = 2, *, reflectivity_scale=None) -> torch.Tensor:
    """Version 2's local mean of |A|^2 on echo's grid: the reflectivity blurred by the Gaussian
    envelope's intensity profile (sigma / sqrt 2 each way), which ignores the spectrum's taper.
    axial_scale: simulation pixels per pixel of `echo` along depth; reflectivity_scale as in
    speckle_envelope."""
    physics = physics_of(physics)
    r = reflectivity(echo) if reflectivity_scale is None else reflectivity(echo) * reflectivity_scale
    r = r @ _blur_matrix(echo.shape[2], SIGMA_LATERAL / math.sqrt(2))
    return _blur_matrix(echo.shape[1], physics.sigma_axial / math.sqrt(2) / axial_scale) @ r


def log_compress(power_db: torch.Tensor) -> torch.Tensor:
    """Power in dB (0 dB = a unit reflector) -> gray level in [0, 255] (float)."""
    return ((power_db + DISPLAY_DB - TOP_DB) * (255.0 / DISPLAY_DB)).clamp(0.0, 255.0)


def _crop_u8(gray: torch.Tensor, margin: int) -> torch.Tensor:
    g = gray[:, margin:gray.shape[1] - margin, margin:gray.shape[2] - margin]
    return g.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)


def _depth_average(gray: torch.Tensor, fine: int) -> torch.Tensor:
    return F.avg_pool2d(gray.unsqueeze(1), (fine, 1)).squeeze(1)


def simulate(echo: torch.Tensor, generator: torch.Generator, physics: Physics | int = PHANTOM_VERSION):
    """Echogenicity maps on the output grid (n, depth, lateral) -> (speckled gray, expected gray
    or version 2's target, envelope on the fine grid), float, uncropped, not rounded."""
    physics = physics_of(physics)
    fine = physics.fine
    echo_fine = F.interpolate(echo.unsqueeze(1), scale_factor=(fine, 1), mode="bilinear",
                              align_corners=False).squeeze(1)
    envelope = speckle_envelope(echo_fine, generator, physics)
    gray = _depth_average(log_compress(20.0 * torch.log10(envelope.clamp(min=1e-12))), fine)
    if physics.target == "v2":
        mean_db = 10.0 * torch.log10(mean_intensity(echo, fine, physics).clamp(min=1e-12)) - RAYLEIGH_LOG_BIAS_DB
        target = log_compress(mean_db)
    else:
        from speckle_models.data.phantom_target import expected_gray

        target = _depth_average(expected_gray(echo_fine, physics), fine)
    return gray, target, envelope


def phantom_chunk(count: int, image_size: int, generator: torch.Generator, *,
                  return_envelope: bool = False, return_geometry: bool = False,
                  version: int = PHANTOM_VERSION):
    """One batch of work: (images, clean) uint8 (count, 1, S, S) [, envelope on the simulation
    grid, margin included] [, geometry rows]. The anatomy is drawn on the output grid (with a
    margin) and upsampled along depth to the simulation grid."""
    m = MARGIN
    echo, geometry = echogenicity_maps(count, image_size, image_size, generator, margin=m,
                                       return_geometry=True)
    gray, target, envelope = simulate(echo, generator, version)
    out = (_crop_u8(gray, m), _crop_u8(target, m))
    if return_envelope:
        out += (envelope,)
    if return_geometry:
        out += (geometry,)
    return out


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + chunk * 7919 + 12345) % (2 ** 63))


def generate_phantom(count: int, *, image_size: int = 128, seed: int = 0,
                     progress: bool = True, desc: str = "phantom",
                     version: int = PHANTOM_VERSION, return_geometry: bool = False):
    """`count` phantom images and their speckle-free maps, both uint8 (count, 1, S, S)
    [, and the float32 (count, GEOMETRY_FIELDS) geometry rows]."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    physics_of(version)
    images = torch.empty(count, 1, image_size, image_size, dtype=torch.uint8)
    clean = torch.empty_like(images)
    geometry = torch.empty(count, GEOMETRY_FIELDS)
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
            images[start:stop], clean[start:stop], geometry[start:stop] = phantom_chunk(
                stop - start, image_size, _chunk_generator(seed, c), return_geometry=True,
                version=version)
            if bar is not None:
                bar.update(stop - start)
    finally:
        torch.set_flush_denormal(False)
        if bar is not None:
            bar.close()
    return (images, clean, geometry) if return_geometry else (images, clean)
