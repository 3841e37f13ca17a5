"""Where the tissue is: ultrasound regions, user boxes, automatic detection, colour pixels, and
the reflection that pads the tissue for the network.

A scanner frame holds more than tissue: patient text, scale bars, ECG traces, colour bars,
colour-Doppler pixels. speckle-denoise changes only grey tissue pixels; everything else stays
bit-identical. The tissue comes, in this order of precedence, from:

1. `--region T,L,H,W` boxes given by the user (repeatable);
2. the DICOM Sequence of Ultrasound Regions (0018,6011): the items with Region Spatial Format
   (0018,6012) = 1 (2D) and Region Data Type (0018,6014) = 1 (tissue); each box is
   RegionLocationMinX0..MaxX1, MinY0..MaxY1 (0018,6018/601A/601C/601E), inclusive;
3. automatic detection over the whole frame (`detect_tissue`).
Within a box of 1 or 2 the same detector finds the tissue itself (a sector's fan inside its
bounding box; the whole box for a linear probe), so the black corners of a sector stay black.

Detection (`detect_tissue`), on the gray level v in [0, 1] of one frame (the first of a cine:
the probe's geometry does not change within a cine):
    signal   = v > BLACK_LEVEL or colour           (Doppler inside the fan is part of the area)
    density  = mean of signal over DENSITY_WINDOW x DENSITY_WINDOW pixels
    area     = density >= DENSITY_MIN, opened with a disk of radius OPEN_RADIUS
    tissue   = the connected component of area with the most gray signal pixels (a colour
               header bar or legend is dense but not gray), its holes filled
Speckle is dense (nearly every pixel above black); text, tick marks and traces are thin strokes
on black, so their density stays low and the opening cuts them off where they touch the fan.
Holes (cysts, vessels: dark but enclosed) are filled so they are despeckled with the tissue.

Colour (`colour_mask`): chroma = max(R, G, B) - min(R, G, B), in units of the frame's maximum
value; a pixel is colour when chroma > CHROMA_MAX (0.1, i.e. 25.5 of 255 levels), grown by one
pixel (JPEG's 4:2:2 chroma subsampling smears the edge of a Doppler patch into its
neighbours). Grey B-mode (even a tinted grey map, chroma <= 0.1) is despeckled; colour is kept,
and so is white (v >= WHITE_LEVEL, 0.98: the lines of a colour box, calipers, burned-in marks;
a saturated reflector is kept as it was, too), each grown by one pixel (`overlay_mask`).

The network's input (`reflect_fill`): the tissue's bounding box grown by the network's
receptive radius on every side; each pixel p outside the tissue mask (black, text, colour, or
beyond the frame) takes the value at 2 q - p, q its nearest tissue pixel (the reflection across
the mask's edge; numpy's "reflect" padding for a rectangle), or the value at q where 2 q - p is
not tissue itself. So the network sees tissue, and tissue only, as far as its receptive field
reaches from any output pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLACK_LEVEL = 0.01
DENSITY_WINDOW = 15
DENSITY_MIN = 0.5
OPEN_RADIUS = 4
CHROMA_MAX = 0.1
WHITE_LEVEL = 0.98
MIN_TISSUE_PIXELS = 32 * 32


@dataclass(frozen=True)
class Box:
    """A rectangle of pixels: rows [top, top + height), columns [left, left + width)."""
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def inside(self, height: int, width: int) -> bool:
        return (self.top >= 0 and self.left >= 0 and self.height >= 1 and self.width >= 1
                and self.top + self.height <= height and self.left + self.width <= width)

    def __str__(self) -> str:
        return f"{self.top},{self.left},{self.height},{self.width}"


@dataclass
class TissuePlan:
    """The tissue of every frame of one file: per part (one region), its box and its mask."""
    how: str                          # "--region" | "ultrasound regions" | "auto-detected" | "whole frame"
    boxes: list[Box]                  # the regions (the whole frame for automatic detection)
    masks: list[np.ndarray] = field(default_factory=list)  # (box.height, box.width) bool each

    @property
    def pixels(self) -> int:
        return int(sum(m.sum() for m in self.masks))

    def describe(self) -> str:
        if self.how == "whole frame":
            return "whole frame"
        return f"{self.how}: " + "; ".join(f"T,L,H,W={b} ({int(m.sum())} px)"
                                           for b, m in zip(self.boxes, self.masks))


class RegionsDoNotFit(ValueError):
    """The file's Ultrasound Regions do not lie inside its pixels (a resized or cropped export)."""


def ultrasound_regions(ds, rows: int, columns: int, name: str) -> list[Box]:
    """The 2D tissue boxes of a dataset's Sequence of Ultrasound Regions ([] without one).
    RegionsDoNotFit naming `name` for a box that does not lie inside the rows x columns image
    (the caller falls back to automatic detection and says so); ValueError for a region
    without a location."""
    boxes = []
    for k, item in enumerate(ds.get("SequenceOfUltrasoundRegions", None) or [], start=1):
        if int(item.get("RegionSpatialFormat", 0)) != 1 or int(item.get("RegionDataType", 0)) != 1:
            continue
        try:
            x0, y0 = int(item.RegionLocationMinX0), int(item.RegionLocationMinY0)
            x1, y1 = int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1)
        except AttributeError as e:
            raise ValueError(f"{name}: ultrasound region {k} has no location ({e})") from e
        box = Box(y0, x0, y1 - y0 + 1, x1 - x0 + 1)
        if not box.inside(rows, columns):
            raise RegionsDoNotFit(f"ultrasound region {k} (x {x0}..{x1}, y {y0}..{y1}) lies outside the "
                                  f"{rows}x{columns} image")
        boxes.append(box)
    return boxes


def check_boxes(boxes: list[Box], rows: int, columns: int, name: str) -> None:
    for box in boxes:
        if not box.inside(rows, columns):
            raise ValueError(f"{name}: --region {box} (T,L,H,W) lies outside the {rows}x{columns} image")


def chroma(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """max(R, G, B) - min(R, G, B) of an (H, W, 3) frame, in units of max_value (float32)."""
    return (pixels.max(axis=2).astype(np.float32) - pixels.min(axis=2)) / np.float32(max_value)


def colour_mask(pixels: np.ndarray, max_value: int) -> np.ndarray | None:
    """Colour pixels of a frame (module docstring); None for a grey (H, W) frame."""
    if pixels.ndim == 2:
        return None
    from scipy import ndimage

    colour = chroma(pixels, max_value) > CHROMA_MAX
    return ndimage.binary_dilation(colour, np.ones((3, 3), bool)) if colour.any() else colour


def overlay_mask(pixels: np.ndarray, v: np.ndarray, max_value: int) -> np.ndarray:
    """Pixels kept as they are inside the tissue: colour and white, grown by one pixel."""
    from scipy import ndimage

    keep = v >= WHITE_LEVEL
    if pixels.ndim == 3:
        keep |= chroma(pixels, max_value) > CHROMA_MAX
    return ndimage.binary_dilation(keep, np.ones((3, 3), bool)) if keep.any() else keep


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius * radius


def detect_tissue(v: np.ndarray, colour: np.ndarray | None = None) -> np.ndarray:
    """The tissue area of a frame (module docstring): an (H, W) bool mask, all False when no
    area of at least min_tissue_pixels is found."""
    from scipy import ndimage

    gray_signal = v > BLACK_LEVEL
    signal = gray_signal if colour is None else gray_signal | colour
    if colour is not None:
        gray_signal &= ~colour
    # reflect / border_value=1: tissue running to the frame's (or the box's) edge keeps its edge
    density = ndimage.uniform_filter(signal.astype(np.float32), DENSITY_WINDOW, mode="reflect")
    dense = density >= DENSITY_MIN
    area = ndimage.binary_dilation(ndimage.binary_erosion(dense, _disk(OPEN_RADIUS), border_value=1),
                                   _disk(OPEN_RADIUS)) & dense
    labels, count = ndimage.label(area)
    if count == 0:
        return np.zeros(v.shape, bool)
    gray_counts = np.bincount(labels.ravel(), weights=gray_signal.ravel(), minlength=count + 1)[1:]
    tissue = labels == 1 + int(gray_counts.argmax())
    tissue = ndimage.binary_fill_holes(tissue)
    return tissue if tissue.sum() >= min_tissue_pixels(v.shape) else np.zeros(v.shape, bool)


def min_tissue_pixels(shape) -> int:
    """The least area taken for tissue: MIN_TISSUE_PIXELS, or a quarter of a smaller frame."""
    return min(MIN_TISSUE_PIXELS, shape[0] * shape[1] // 4)


def plan_tissue(v: np.ndarray, colour: np.ndarray | None, *, user_boxes: list[Box],
                file_boxes: list[Box], name: str, why_detected: str = "") -> TissuePlan:
    """The tissue plan of a file from its first frame's gray level v (module docstring).
    ValueError naming the file when no tissue is found."""
    rows, columns = v.shape
    if user_boxes:
        check_boxes(user_boxes, rows, columns, name)
        plan = TissuePlan("--region", list(user_boxes))
    elif file_boxes:
        plan = TissuePlan("ultrasound regions", list(file_boxes))
    else:
        plan = TissuePlan("auto-detected" + (f" ({why_detected})" if why_detected else ""),
                          [Box(0, 0, rows, columns)])
    boxes, masks = [], []
    for box in plan.boxes:
        part = detect_tissue(v[box.slices], None if colour is None else colour[box.slices])
        if not part.any():
            continue
        if plan.how.startswith("auto-detected"):  # the box becomes the detected area's bounding box
            r, c = np.nonzero(part.any(axis=1))[0], np.nonzero(part.any(axis=0))[0]
            box = Box(int(r[0]), int(c[0]), int(r[-1] - r[0] + 1), int(c[-1] - c[0] + 1))
            part = part[box.slices]
        boxes.append(box)
        masks.append(part)
    if not boxes:
        where = "the whole frame" if plan.how.startswith("auto-detected") else f"the {plan.how} box(es)"
        raise ValueError(f"{name}: no tissue found in {where} (a dense area of gray pixels above "
                         f"{BLACK_LEVEL:g} of full scale, at least {min_tissue_pixels(v.shape)} pixels); "
                         "give it with --region T,L,H,W or use --whole-frame")
    plan.boxes, plan.masks = boxes, masks
    return plan


def whole_frame_plan(rows: int, columns: int) -> TissuePlan:
    return TissuePlan("whole frame", [Box(0, 0, rows, columns)], [np.ones((rows, columns), bool)])


def reflection_index(known: np.ndarray) -> np.ndarray:
    """For every pixel of an (H, W) mask, the flat index of the pixel whose value it takes:
    itself inside `known`, its reflection across the mask's edge outside (module docstring)."""
    from scipy import ndimage

    h, w = known.shape
    if known.all():
        return np.arange(h * w)
    _, (qr, qc) = ndimage.distance_transform_edt(~known, return_indices=True)
    rr, cc = np.indices(known.shape)
    pr, pc = 2 * qr - rr, 2 * qc - cc  # the mirror image of p across q
    ok = (pr >= 0) & (pr < h) & (pc >= 0) & (pc < w)
    pr, pc = np.where(ok, pr, qr), np.where(ok, pc, qc)
    ok = known[pr, pc]
    pr, pc = np.where(ok, pr, qr), np.where(ok, pc, qc)
    return (pr * w + pc).ravel()


def reflect_fill(v: np.ndarray, known: np.ndarray) -> np.ndarray:
    """v with every pixel outside `known` replaced by its reflection across the mask's edge."""
    return v.ravel()[reflection_index(known)].reshape(v.shape)
