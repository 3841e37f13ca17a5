"""A domain-randomised B-mode phantom ("--phantom realistic"): phantom.py's anatomy and speckle
physics, imaged by a randomly drawn scanner, each image's draw seeded and recorded.

The classic phantom (phantom.py) has one scanner: one PSF, dense scatterers, 55 dB shown
linearly, no gain or TGC, a square linear image. A real scan differs in exactly these, and a
network trained on one scanner meets another at inference. Per image, from its own generator
(seeded by (seed, index), so any image can be rebuilt alone), this module draws:

- geometry: linear (the image, possibly with a black stand-off band on top and black side
  margins) or sector (phased / curvilinear fan: apex APEX above the top edge, half-angle
  THETA, black outside the fan);
- speckle grain: the display grain g_z, g_x (autocorrelation FWHM) in [GRAIN_MIN, GRAIN_MAX]
  px, independently (anisotropic). The echoes are simulated in the beam domain (depth samples x lines) with
  phantom.py's pulse and beam; a beam sample spans k = g / BASE_GRAIN display pixels, so the
  scan conversion (bilinear, the scanner's own step) scales the grain to g (in a sector,
  laterally at mid-depth: the grain widens with depth as on a real fan);
- scatterer density: phantom.py's density times d, log-uniform in [DENSITY_MIN, 1] (sparse
  scatterers: under-developed, spotty speckle);
- anechoic cysts: 0-3 discs in which the reflectivity is 0 (no scatterers), on top of the
  anatomy's vessels and nerves. phantom.py's pulse reaches down to DC (a fractional bandwidth
  near 2), so its analytic signal keeps 1/t^3 Hilbert tails along depth (-41 dB at 5 samples,
  -48 dB at 7, -60 dB at 10) that would fill a cyst to a grey no scanner shows; a scanner's
  pulse is band-limited with a compact envelope. So inside a cyst, farther than the PSF's
  reach (REACH: depth samples, lines) from any scatterer, the envelope is set to exactly 0:
  truly black, as the speckle-free map is;
- dynamic range DR in [DR_MIN, DR_MAX] dB, overall gain in +-GAIN dB, a TGC curve (piecewise
  linear in depth through TGC_KNOTS knots, each +-TGC dB), and a display curve gray = u^gamma
  (u the log-compressed level in [0, 1], gamma log-uniform in [1 / GAMMA, GAMMA]).

The anatomy (phantom.echogenicity_maps) lives in display coordinates and is sampled at the
beam samples' positions; so are the cysts. The speckle-free map goes through the same chain
with the local mean intensity (phantom.mean_intensity) in place of the envelope, less the
Rayleigh log bias, as in phantom.py. Display: beam samples -> dB (+ gain + TGC) -> u =
clip((dB + DR - TOP_DB) / DR, 0, 1) -> scan conversion -> u^gamma -> 8 bits.

generate_realistic_phantom returns the images, their maps and the list of per-image draws
(dicts), which datasets.py stores with the cache and hands out in UltrasoundData.info.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speckle_models.data import phantom as P

REALISTIC_VERSION = 1
GRAIN_MIN, GRAIN_MAX = 1.0, 5.0          # display speckle grain (px), each axis
# phantom.py's grain: the autocorrelation FWHM of its log-compressed speckle in simulation
# samples (axial, lateral), measured by self_supervised.measure_correlation on 8 images of
# 128 x 128 imaged at one display px a sample (2026-12-03): 3.44 x 3.04
BASE_GRAIN = (3.44, 3.04)
DENSITY_MIN = 0.03
DR_MIN, DR_MAX = 40.0, 75.0
GAIN, TGC, TGC_KNOTS = 8.0, 6.0, 4
GAMMA = 1.6
SECTOR_PROBABILITY = 0.5
MAX_CYSTS = 3
MARGIN = 6
REACH = (6, 5)                           # beam samples: the pulse to -48 dB; the beam's cut-off


def _u(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def draw_scanner(g: torch.Generator) -> dict:
    """One image's scanner and extra anatomy, as plain numbers (recorded with the image)."""
    d = {"geometry": "sector" if _u(g, 0, 1) < SECTOR_PROBABILITY else "linear",
         "grain_axial": _u(g, GRAIN_MIN, GRAIN_MAX), "grain_lateral": _u(g, GRAIN_MIN, GRAIN_MAX),
         "density": math.exp(_u(g, math.log(DENSITY_MIN), 0.0)),
         "dynamic_range_db": _u(g, DR_MIN, DR_MAX), "gain_db": _u(g, -GAIN, GAIN),
         "tgc_db": [_u(g, -TGC, TGC) for _ in range(TGC_KNOTS)],
         "gamma": math.exp(_u(g, -math.log(GAMMA), math.log(GAMMA)))}
    if d["geometry"] == "sector":
        d.update(apex=_u(g, 0.0, 0.6), half_angle_deg=_u(g, 22.0, 45.0), top_gap=_u(g, 0.0, 0.08))
    else:
        d.update(standoff=_u(g, 0.0, 0.1), side_margin=_u(g, 0.0, 0.1))
    d["cysts"] = [[_u(g, 0.2, 0.8), _u(g, 0.25, 0.85), _u(g, 0.04, 0.12)]   # (x, z, radius) / S
                  for _ in range(int(torch.randint(MAX_CYSTS + 1, (), generator=g)))]
    return d


def _beam_positions(d: dict, size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """World (z, x) display coordinates of the beam samples, (Nr, Nl) each, and (Nr, Nl)."""
    s = float(size)
    kz = d["grain_axial"] / BASE_GRAIN[0]           # display px per beam sample, axially
    kx = d["grain_lateral"] / BASE_GRAIN[1]
    if d["geometry"] == "sector":
        apex, theta = d["apex"] * s, math.radians(d["half_angle_deg"])
        r0, r1 = apex + d["top_gap"] * s, apex + s
        nr = max(8, round((r1 - r0) / kz))
        nl = max(8, round(2 * theta * (r0 + r1) / 2 / kx))
        r = r0 + (torch.arange(nr) + 0.5) / nr * (r1 - r0)
        t = -theta + (torch.arange(nl) + 0.5) / nl * 2 * theta
        z = r.view(-1, 1) * torch.cos(t).view(1, -1) - apex
        x = r.view(-1, 1) * torch.sin(t).view(1, -1) + s / 2
    else:
        z0, x0 = d["standoff"] * s, d["side_margin"] * s
        nr, nl = max(8, round((s - z0) / kz)), max(8, round((s - 2 * x0) / kx))
        z = (z0 + (torch.arange(nr) + 0.5) / nr * (s - z0)).view(-1, 1).expand(nr, nl)
        x = (x0 + (torch.arange(nl) + 0.5) / nl * (s - 2 * x0)).view(1, -1).expand(nr, nl)
    return z, x, (nr, nl)


def _sample(world: torch.Tensor, z: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear samples of a (size, size) world map at display coordinates (z, x)."""
    grid = torch.stack([(x + 0.5) / size * 2 - 1, (z + 0.5) / size * 2 - 1], dim=-1)[None]
    return F.grid_sample(world[None, None], grid.float(), mode="bilinear", padding_mode="border",
                         align_corners=False)[0, 0]


def _scan_convert(beam: torch.Tensor, d: dict, size: int) -> torch.Tensor:
    """Beam-domain image (Nr, Nl) -> (size, size) display, 0 outside the imaged area."""
    s = float(size)
    nr, nl = beam.shape
    zz, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if d["geometry"] == "sector":
        apex, theta = d["apex"] * s, math.radians(d["half_angle_deg"])
        r0, r1 = apex + d["top_gap"] * s, apex + s
        r = torch.sqrt((zz + apex) ** 2 + (xx - s / 2) ** 2)
        t = torch.atan2(xx - s / 2, zz + apex)
        fr, fl = (r - r0) / (r1 - r0), (t + theta) / (2 * theta)
    else:
        z0, x0 = d["standoff"] * s, d["side_margin"] * s
        fr, fl = (zz - z0) / (s - z0), (xx - x0) / (s - 2 * x0)
    inside = (fr >= 0) & (fr <= 1) & (fl >= 0) & (fl <= 1)
    grid = torch.stack([fl * 2 - 1, fr * 2 - 1], dim=-1)[None].float()
    out = F.grid_sample(beam[None, None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)[0, 0]
    return torch.where(inside, out, torch.zeros(()))


def _cyst_scale(d: dict, z: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Reflectivity multiplier at (z, x): 0 inside the cysts (one-pixel soft edge), else 1."""
    scale = torch.ones_like(z)
    for cx, cz, rad in d["cysts"]:
        dist = torch.sqrt((x - cx * size) ** 2 + (z - cz * size) ** 2) - rad * size
        scale = scale * torch.sigmoid(dist / 0.5)
    return scale


def _display(power_db: torch.Tensor, d: dict) -> torch.Tensor:
    """Beam-domain power (dB, 0 = a unit reflector) -> log-compressed level u in [0, 1]."""
    nr = power_db.shape[0]
    knots = torch.tensor(d["tgc_db"], dtype=power_db.dtype)
    depth = torch.linspace(0, len(knots) - 1, nr)
    lo = depth.floor().long().clamp(max=len(knots) - 2)
    tgc = torch.lerp(knots[lo], knots[lo + 1], depth - lo)
    db = power_db + d["gain_db"] + tgc.view(-1, 1)
    return ((db + d["dynamic_range_db"] - P.TOP_DB) / d["dynamic_range_db"]).clamp(0.0, 1.0)


def realistic_image(d: dict, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, speckle-free map) uint8 (1, size, size) of one scanner draw `d`."""
    world = P.echogenicity_maps(1, size, size, g)[0]
    z, x, (nr, nl) = _beam_positions(d, size)
    m = MARGIN
    zp = F.pad(z[None, None], (m, m, m, m), mode="replicate")[0, 0]   # margin beyond the image
    xp = F.pad(x[None, None], (m, m, m, m), mode="replicate")[0, 0]
    echo = _sample(world, zp, xp, size)[None]
    cyst = _cyst_scale(d, zp, xp, size)[None]
    # physics version 2: the pulse this phantom was built and measured with (docs/self_supervised.md)
    env = P.speckle_envelope(echo, g, 2, density_scale=d["density"], reflectivity_scale=cyst)
    rz, rx = REACH
    empty = -F.max_pool2d(-(cyst < 1e-3).float()[None], (2 * rz + 1, 2 * rx + 1), stride=1,
                          padding=(rz, rx))[0] > 0.5      # no scatterer within the reach
    env = torch.where(empty, torch.zeros(()), env)
    mean = P.mean_intensity(echo, physics=2, reflectivity_scale=cyst)
    crop = (slice(m, m + nr), slice(m, m + nl))
    speckled = _display(20 * torch.log10(env[0][crop].clamp(min=1e-12)), d)
    clean = _display(10 * torch.log10(mean[0][crop].clamp(min=1e-12)) - P.RAYLEIGH_LOG_BIAS_DB, d)
    out = []
    for beam in (speckled, clean):
        u = _scan_convert(beam, d, size) ** d["gamma"]
        out.append((u * 255).round().clamp(0, 255).to(torch.uint8)[None])
    return out[0], out[1]


def _image_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 104_729 + 777) % (2 ** 63))


def generate_realistic_phantom(count: int, *, image_size: int = 128, seed: int = 0,
                               progress: bool = True, desc: str = "realistic phantom"):
    """(images, maps) uint8 (count, 1, S, S) and the per-image scanner draws (list of dicts)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    images = torch.empty(count, 1, image_size, image_size, dtype=torch.uint8)
    clean = torch.empty_like(images)
    draws = []
    bar = None
    if progress and count > 64:
        from tqdm.auto import tqdm
        bar = tqdm(total=count, desc=desc, unit="img")
    torch.set_flush_denormal(True)      # as phantom.generate_phantom: the Gaussian tails
    try:
        for i in range(count):
            g = _image_generator(seed, i)
            d = draw_scanner(g)
            images[i], clean[i] = realistic_image(d, image_size, g)
            draws.append({"index": i, "seed": seed, **d})
            if bar is not None:
                bar.update(1)
    finally:
        torch.set_flush_denormal(False)
        if bar is not None:
            bar.close()
    return images, clean, draws
