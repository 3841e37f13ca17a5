"""Regions of known geometry in the phantom's images, from their geometry rows (phantom.py):
what the structure metrics of speckle-reproduce measure on.

Coordinates of output pixel (i, j) of an S x S image: z = (i + 0.5) / S, x = (j + 0.5) / S, as
the anatomy is drawn. Round section k (present, centre (cx, cz), radii (rx, rz)) has the
squared elliptic radius r2 = ((x - cx) / rx)^2 + ((z - cz) / rz)^2; interface k runs along
z = depth_k + tilt_k (x - 0.5) + amp_k sin(2 pi (freq_k x + phase_k)).

- lesion_regions: for each present section, the *lesion* r <= LESION_RADIUS (its core: the
  sigmoid edge leaks < 0.1% there, and the rim, exp(-0.5 ((r2 - 1) / 0.3)^2) times 0.8-1,
  which peaks at r = 1, is below 0.1 of full echogenicity) and its *surroundings*
  SURROUND[0] <= r <= SURROUND[1] (the rim below 0.01 there). Pixels within r <= EXCLUDE of another present section, or above the skin
  line plus 0.03, belong to neither (another section's rim is below 0.01 beyond r = 1.4). A section counts (valid) when both regions keep at least
  MIN_PIXELS pixels in the image.
- known_boundaries: the pixels where a section's contour (r = 1) or an interface passes
  between a pixel and its right or lower neighbour (a sign change of r2 - 1, or of z - s(x));
  interface pixels inside a present section (r < 1, where the section overwrites the layers)
  are left out.
- edge_band: pixels within `width` pixels (Euclidean) of a known boundary pixel.
"""
from __future__ import annotations

import math

import torch

from speckle_models.data.phantom import GEOMETRY_FIELDS

LESION_RADIUS = 0.6
SURROUND = (1.4, 1.8)
EXCLUDE = 1.4
MIN_PIXELS = 30
_SLOTS = 3


def _check(geometry: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(geometry, torch.Tensor) or geometry.dim() != 2 or geometry.shape[1] != GEOMETRY_FIELDS:
        raise ValueError(f"geometry must be a (N, {GEOMETRY_FIELDS}) tensor, got "
                         f"{tuple(getattr(geometry, 'shape', ()))}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    return geometry.double()


def _grid(size: int):
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return t.view(1, -1, 1), t.view(1, 1, -1)          # z (rows), x (columns)


def _sections(g: torch.Tensor, size: int):
    """(present (N, 3), r (N, 3, S, S) elliptic radius)."""
    z, x = _grid(size)
    s = g[:, 16:].view(-1, _SLOTS, 6)
    present = s[..., 0] > 0.5
    cx, cz, rx, rz = (s[..., i].view(-1, _SLOTS, 1, 1) for i in (2, 3, 4, 5))
    r = (((x.unsqueeze(1) - cx) / rx) ** 2 + ((z.unsqueeze(1) - cz) / rz) ** 2).sqrt()
    return present, r


def _interfaces(g: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, 1, S) interface depth at each column."""
    _, x = _grid(size)
    depth, tilt, amp, freq, phase = (g[:, 3 * i:3 * i + 3].view(-1, 3, 1, 1) for i in range(5))
    return depth + tilt * (x.unsqueeze(1) - 0.5) + amp * torch.sin(2 * math.pi * (freq * x.unsqueeze(1) + phase))


def lesion_regions(geometry: torch.Tensor, size: int):
    """(lesion masks (N, 3, S, S), surroundings masks (N, 3, S, S), valid (N, 3)), booleans."""
    g = _check(geometry, size)
    present, r = _sections(g, size)
    z, _ = _grid(size)
    below_skin = (z > g[:, 15].view(-1, 1, 1) + 0.03).unsqueeze(1)           # (N, 1, S, 1)
    near = (r <= EXCLUDE) & present.view(-1, _SLOTS, 1, 1)
    others = torch.stack([near[:, [j for j in range(_SLOTS) if j != k]].any(1)
                          for k in range(_SLOTS)], 1)
    keep = below_skin & ~others & present.view(-1, _SLOTS, 1, 1)
    lesion = (r <= LESION_RADIUS) & keep
    surround = (r >= SURROUND[0]) & (r <= SURROUND[1]) & keep
    valid = (lesion.flatten(2).sum(2) >= MIN_PIXELS) & (surround.flatten(2).sum(2) >= MIN_PIXELS)
    return lesion, surround, valid


def known_boundaries(geometry: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S) boolean: pixels on a section's contour or on an interface (module docstring)."""
    g = _check(geometry, size)
    present, r = _sections(g, size)
    z, _ = _grid(size)
    out = torch.zeros(g.shape[0], size, size, dtype=torch.bool)

    def crossings(f: torch.Tensor) -> torch.Tensor:       # f (..., S, S): sign changes
        pos = f > 0
        m = torch.zeros_like(pos)
        m[..., :, :-1] |= pos[..., :, :-1] != pos[..., :, 1:]
        m[..., :-1, :] |= pos[..., :-1, :] != pos[..., 1:, :]
        return m

    contours = crossings(r - 1.0) & present.view(-1, _SLOTS, 1, 1)
    inside_any = ((r < 1.0) & present.view(-1, _SLOTS, 1, 1)).any(1)
    layers = crossings(z.unsqueeze(1) - _interfaces(g, size)).any(1) & ~inside_any
    out |= contours.any(1) | layers
    return out


def edge_band(boundaries: torch.Tensor, width: float = 3.0) -> torch.Tensor:
    """(N, S, S) boolean: within `width` pixels of a boundary pixel (Euclidean distance)."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    b = boundaries.cpu().numpy()
    if len(b) == 0:
        return boundaries.clone()
    return torch.from_numpy(np.stack([distance_transform_edt(~img) <= width if img.any()
                                      else img.copy() for img in b]))
