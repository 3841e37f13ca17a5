"""The image files speckle-denoise reads and writes: PNG, JPEG, TIFF (Pillow) and DICOM (pydicom).

Reading (`read_image`) turns one file into `ImageFrames`: every frame as a float32 (H, W) array
of v = stored value / max_value in [0, 1], the intensity the networks were trained on (speckle-
train normalizes v = u8 / 255 and feeds (v - 0.5) / 0.5):

    8-bit gray (L), JPEG, palette, 1-bit       max_value 255
    16-bit gray PNG/TIFF (I;16*; I in 0..65535)  max_value 65535 (v = u16 / 65535, so a 16-bit
                                               image the network sees at its full range)
    DICOM                                      max_value 2**BitsStored - 1 (12-bit data: / 4095)
    RGB(A), palette, CMYK, YCbCr               luminance Y = 0.299 R + 0.587 G + 0.114 B
                                               (ITU-R BT.601, the weights Pillow's "L" uses), in
                                               float, not rounded to 8 bits; alpha is dropped

Multi-page TIFF, animated PNG and multi-frame (cine) DICOM give one frame per page. DICOM
MONOCHROME1 (high = dark) is inverted to the display convention (high = bright) and stays so
in the output; signed, float and palette-colour DICOM pixel data are refused, as are 32-bit
float images and formats other than the four above. Every refusal is a ValueError naming the
file (ModuleNotFoundError for DICOM without pydicom, naming the file and the extra to install).

Writing (`write_image`): frames quantized back to the input's scale (round(v * max_value), uint8
when max_value <= 255, else uint16) as grayscale PNG or TIFF, through atomic_file: a temp file
beside the target, moved into place when complete; overwrite=False refuses an existing file.
A multi-frame input becomes one multi-page TIFF, or one PNG per frame (`frame_paths`).
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
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}
DICOM_INSTALL = "pip install 'speckle-kernels[dicom]' (or: pip install pydicom)"
DICOM_DECODERS = ("pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                  "(JPEG, JPEG-LS, JPEG 2000) or pip install python-gdcm")


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


def read_image(path: str | os.PathLike) -> ImageFrames:
    """Every frame of one image file (module docstring); ValueError naming the file if it
    is corrupt, of an unsupported format or pixel type, or has no frame."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    return _read_dicom(path) if is_dicom(path) else _read_pillow(path)


def _read_pillow(path: Path) -> ImageFrames:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            kind = _PIL_FORMATS.get(im.format or "")
            if kind is None:
                raise ValueError(f"{path}: unsupported image format {im.format} "
                                 "(speckle-denoise reads PNG, JPEG, TIFF and DICOM)")
            pages = [_pil_frame(frame.copy(), path) for frame in ImageSequence.Iterator(im)]
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        # OSError: truncated or damaged data found while decoding (Pillow's "image file is
        # truncated", zlib errors); SyntaxError: a damaged header (Pillow's own use of it).
        raise ValueError(f"{path}: not a readable PNG, JPEG or TIFF image "
                         f"({type(e).__name__}: {e})") from e
    scales = {m for _, m in pages}
    if len(scales) > 1:
        raise ValueError(f"{path}: frames of different bit depths ({sorted(scales)})")
    return ImageFrames(path, [v for v, _ in pages], scales.pop(), kind)


def _pil_frame(im, path: Path) -> tuple[np.ndarray, int]:
    """(v, max_value) of one Pillow frame."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32) / 65535.0, 65535
    if mode == "I":  # 16-bit PNG/TIFF in some Pillow versions; accepted when it fits 16 bits
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{path}: 32-bit integer pixels outside 0..65535 are not supported")
        return a.astype(np.float32) / 65535.0, 65535
    if mode == "F":
        raise ValueError(f"{path}: 32-bit float pixels are not supported (8- or 16-bit images only)")
    if mode in ("L", "LA", "La"):
        return np.asarray(im.getchannel(0), dtype=np.float32) / 255.0, 255
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0, 255
    if mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
        im = im.convert("RGBA" if mode in ("P", "PA") else "RGB")  # palette, CMYK, YCbCr, LAB...
    return luminance(np.asarray(im)) / 255.0, 255


def _read_dicom(path: Path) -> ImageFrames:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:
        raise ModuleNotFoundError(f"{path} is a DICOM file; reading DICOM needs pydicom: "
                                  f"{DICOM_INSTALL}") from e
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ValueError(f"{path}: not a valid DICOM file ({e})") from e
    except Exception as e:  # truncated elements, bad lengths...
        raise ValueError(f"{path}: corrupt DICOM file ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file without (integer) pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        raise ValueError(f"{path}: palette-colour DICOM is not supported")
    if int(ds.get("PixelRepresentation", 0)) != 0:
        raise ValueError(f"{path}: signed DICOM pixel data is not supported (unsigned 8-16 bit only)")
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 0)))
    if not 1 <= bits <= 16:
        raise ValueError(f"{path}: {bits}-bit DICOM pixel data is not supported (1-16 bits)")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array  # pydicom 3 converts YBR colour to RGB here
    except Exception as e:  # no decoder for the transfer syntax, or damaged pixel data
        what = f"transfer syntax {ts.name} ({ts})" if ts is not None else "an unknown transfer syntax"
        compressed = ts is not None and getattr(ts, "is_compressed", False)
        hint = f"; compressed pixel data needs a decoder: {DICOM_DECODERS}" if compressed else ""
        raise ValueError(f"{path}: cannot decode DICOM pixel data with {what}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}") from e
    samples = int(ds.get("SamplesPerPixel", 1))
    frames_n = int(ds.get("NumberOfFrames", 1) or 1)
    if frames_n == 1:
        arr = arr[None]
    expected_dim = 4 if samples > 1 else 3
    if arr.ndim != expected_dim:
        raise ValueError(f"{path}: unexpected DICOM pixel array shape {arr.shape} "
                         f"({frames_n} frames, {samples} samples per pixel)")
    max_value = 2 ** bits - 1
    if samples > 1:
        frames = [luminance(f) for f in arr]
    else:
        frames = [f.astype(np.float32) for f in arr]
    frames = [np.clip(f / np.float32(max_value), 0.0, 1.0) for f in frames]
    if photometric == "MONOCHROME1":
        frames = [1.0 - f for f in frames]
    return ImageFrames(path, frames, max_value, "dicom")


# ----------------------------------------------------------------------------- writing

def frame_paths(stem: Path, frames: int, fmt: str) -> list[Path]:
    """Where `frames` output frames of one input go: stem.png / stem.tif for one frame; a
    multi-page stem.tif, or stem.f0000.png, stem.f0001.png, ... for several."""
    suffix = OUTPUT_FORMATS[fmt]
    if frames == 1 or fmt == "tiff":
        return [stem.with_name(stem.name + suffix)]
    return [stem.with_name(f"{stem.name}.f{i:04d}{suffix}") for i in range(frames)]


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
