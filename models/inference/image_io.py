"""Gray levels and whole images: the helpers speckle-denoise's sources, sinks and API share.

The gray level v in [0, 1] (float32) is what the networks were trained on (speckle-train
normalizes v = u8 / 255 and feeds (v - 0.5) / 0.5), from a frame's pixels P at its scale M:

    8-bit gray (L), JPEG, palette, 1-bit       M = 255
    16-bit gray PNG/TIFF (I;16*; I in 0..65535)  M = 65535 (a 16-bit image at its full range)
    DICOM gray                                 M = 2**BitsStored - 1 (12-bit data: / 4095)
    colour (RGB, and what comes to RGB)        luminance Y = 0.299 R + 0.587 G + 0.114 B
                                               (ITU-R BT.601, the weights Pillow's "L" uses), in
                                               float, not rounded to 8 bits; alpha is dropped

`read_image` reads a whole file this way through its frame source (frame_io.py: PNG, JPEG,
TIFF through Pillow; DICOM through dicom_io.py, where the kinds, syntaxes and refusals are).
Every refusal is a ValueError naming the file (ModuleNotFoundError for DICOM without pydicom,
naming the file and the extra to install).

Writing: `quantize` maps v back to the scale (round(v * M), uint8 when M <= 255, else uint16);
`write_image` writes whole gray frames as PNG or (multi-page) TIFF, `write_figure` a before |
after picture, through atomic_file (a temp file beside the target, moved into place when
complete; overwrite=False refuses an existing file). speckle-denoise itself streams frames
into frame_io's sinks.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speckle_models.atomic_write import atomic_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
OUTPUT_FORMATS = {"png": ".png", "tiff": ".tif"}
LUMA_601 = (0.299, 0.587, 0.114)


@dataclass
class ImageFrames:
    """One input file: its frames as v in [0, 1] and the scale to write them back at."""
    path: Path
    frames: list[np.ndarray]   # (H, W) float32 each; sizes may differ between TIFF pages
    max_value: int             # v = stored / max_value
    kind: str                  # "png" | "jpeg" | "tiff" | "dicom"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.max_value <= 255 else np.uint16)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (..., 3 or 4) array, in float32 on the input's scale."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    return LUMA_601[0] * r + LUMA_601[1] * g + LUMA_601[2] * b


def to_unit(image: np.ndarray, name: str = "image") -> tuple[np.ndarray, int | None]:
    """(v in [0, 1] as float32 (H, W), max_value) of an array: uint8 / 255, uint16 / 65535,
    floats taken as v already (max_value None); (H, W, 3|4) colour goes to BT.601 luminance."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        gray = luminance(a)
    elif a.ndim == 2:
        gray = a
    else:
        raise ValueError(f"{name}: expected an (H, W) or (H, W, 3|4) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        return (np.asarray(gray, np.float32) / 255.0), 255
    if a.dtype == np.uint16:
        return (np.asarray(gray, np.float32) / 65535.0), 65535
    if np.issubdtype(a.dtype, np.floating):
        v = np.asarray(gray, np.float32)
        if not np.isfinite(v).all() or v.min() < 0 or v.max() > 1:
            raise ValueError(f"{name}: float images must hold values in [0, 1]")
        return v, None
    raise ValueError(f"{name}: unsupported dtype {a.dtype} (uint8, uint16 or float in [0, 1])")


def quantize(v: np.ndarray, max_value: int) -> np.ndarray:
    """round(v * max_value) as uint8 (max_value <= 255) or uint16."""
    dtype = np.uint8 if max_value <= 255 else np.uint16
    return np.rint(np.clip(v, 0.0, 1.0) * max_value).astype(dtype)


# ----------------------------------------------------------------------------- reading

def is_dicom(path: Path) -> bool:
    """The DICOM preamble's magic ("DICM" at byte 128), or a .dcm/.dicom name."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def gray_level(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """v in [0, 1], float32, of a frame at max_value: P / M for gray, BT.601 luminance / M for
    (H, W, 3) colour."""
    g = luminance(pixels) if pixels.ndim == 3 else pixels.astype(np.float32)
    return np.clip(g / np.float32(max_value), 0.0, 1.0)


def read_image(path: str | os.PathLike) -> ImageFrames:
    """Every frame of one image file as gray levels (module docstring), through the file's
    frame source (frame_io.open_source); ValueError naming the file if it is corrupt, of an
    unsupported format or pixel type, or has no frame."""
    from speckle_models.inference.frame_io import open_source

    source = open_source(path)
    frames = [gray_level(f, source.max_value) for f in source]
    if not frames:
        raise ValueError(f"{source.path}: no frames")
    return ImageFrames(source.path, frames, source.max_value, source.kind)


# ----------------------------------------------------------------------------- writing

def _encode(f, frames: list[np.ndarray], fmt: str) -> None:
    """The one place output image bytes are written (tests make it fail on purpose)."""
    from PIL import Image

    images = [Image.fromarray(a) for a in frames]  # uint8 -> L, uint16 -> I;16
    buf = io.BytesIO()  # Pillow's multi-page TIFF writer reads back what it wrote
    if fmt == "tiff":
        images[0].save(buf, format="TIFF", save_all=len(images) > 1, append_images=images[1:])
    else:
        images[0].save(buf, format="PNG")
    f.write(buf.getvalue())


def write_image(path: Path, frames: list[np.ndarray], fmt: str, *, overwrite: bool = False) -> None:
    """Write uint8/uint16 (H, W) frames as one PNG (one frame) or one (multi-page) TIFF."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected {' or '.join(OUTPUT_FORMATS)}")
    if fmt == "png" and len(frames) != 1:
        raise ValueError("a PNG holds one frame; write multi-frame output frame by frame")
    with atomic_file(path, overwrite=overwrite) as f:
        _encode(f, frames, fmt)


def write_figure(path: Path, before: np.ndarray, after: np.ndarray, max_value: int, *,
                 overwrite: bool = False) -> None:
    """Input and output side by side, 8-bit gray, with a 4-pixel mid-gray gap."""
    h = before.shape[0]
    to8 = lambda a: quantize(a.astype(np.float32) / max_value, 255)  # noqa: E731
    gap = np.full((h, 4), 128, np.uint8)
    with atomic_file(path, overwrite=overwrite) as f:
        _encode(f, [np.concatenate([to8(before), gap, to8(after)], axis=1)], "png")
