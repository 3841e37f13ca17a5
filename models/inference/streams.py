"""Frames read one at a time and written one at a time: the ends of speckle-denoise's pipeline.

Reading (`open_frames(path)` -> FrameSource): the file's frame count, kind and scale are read
from its header; iterating decodes one frame per step (Pillow seeks page by page in a
multi-page TIFF or an animated PNG), so a long cine is never all in memory. 8-bit and 16-bit
gray frames come out as their stored values (uint8 / uint16; the pipeline divides by max_value
into its own buffer, the same float32 arithmetic as image_io's v = value / max_value), other
modes as v in [0, 1] exactly as image_io.read_image gives them. A page of another bit depth than
the first is a ValueError naming the file and the page, raised when it is reached. DICOM is read
whole by image_io.read_image for now (its lazy reader is another module's job) and yields v.

Writing (`open_writer(stem, count, fmt)` -> a writer with write(frame), commit(), abort()):
- tiff: one (multi-page) TIFF, streamed page by page with tifffile into a temp file beside the
  target, moved into place by commit (atomic_write.atomic_path); abort removes the temp file.
- png: stem.png for one frame, stem.f0000.png ... for several, each written atomically when
  it arrives; abort removes the ones this writer wrote.
overwrite=False refuses an existing target (FileExistsError) before anything is written.
Frames are uint8 / uint16 (H, W) arrays; write() encodes before returning, so the caller may
reuse the array afterwards (the pipeline's buffers are recycled).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from speckle_models.atomic_write import atomic_path
from speckle_models.inference.image_io import (_PIL_FORMATS, _pil_frame, frame_paths, is_dicom, read_image,
                                               write_image)


class _Abort(Exception):
    """Thrown into atomic_path to discard its temp file."""


@dataclass
class FrameSource:
    """One input file, lazily: iterate for its frames (stored values or v, module docstring)."""
    path: Path
    count: int
    max_value: int
    kind: str

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.kind == "dicom":
            yield from read_image(self.path).frames
            return
        yield from _pillow_pages(self.path, self.max_value)


def _raw_or_unit(im, path: Path) -> tuple[np.ndarray, int]:
    """(frame, max_value): stored values for 8/16-bit gray, else image_io's v."""
    if im.mode == "L":
        return np.asarray(im), 255
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im).astype(np.uint16, copy=False), 65535
    return _pil_frame(im, path)


def _pillow_pages(path: Path, max_value: int) -> Iterator[np.ndarray]:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            for k, page in enumerate(ImageSequence.Iterator(im)):
                frame, scale = _raw_or_unit(page, path)
                if scale != max_value:
                    raise ValueError(f"{path}: page {k} has max value {scale}, page 0 {max_value} "
                                     "(frames of different bit depths)")
                yield frame
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def open_frames(path: str | os.PathLike) -> FrameSource:
    """The frames of one image file, to be read one by one (module docstring). ValueError
    naming the file if it is not a readable PNG, JPEG, TIFF or DICOM image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    if is_dicom(path):
        image = read_image(path)
        return FrameSource(path, len(image.frames), image.max_value, "dicom")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            kind = _PIL_FORMATS.get(im.format or "")
            if kind is None:
                raise ValueError(f"{path}: unsupported image format {im.format} "
                                 "(speckle-denoise reads PNG, JPEG, TIFF and DICOM)")
            count = int(getattr(im, "n_frames", 1) or 1)
            _, max_value = _raw_or_unit(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path}: not a readable PNG, JPEG or TIFF image "
                         f"({type(e).__name__}: {e})") from e
    return FrameSource(path, count, max_value, kind)


class TiffWriter:
    """A multi-page grayscale TIFF written page by page into a temp file, published on commit."""

    def __init__(self, path: Path, *, overwrite: bool = False):
        import tifffile

        self.path = path
        self._publish = atomic_path(path, overwrite=overwrite)
        tmp = self._publish.__enter__()
        try:
            self._tif = tifffile.TiffWriter(tmp)
        except BaseException as e:
            self._publish.__exit__(type(e), e, e.__traceback__)
            raise

    def write(self, frame: np.ndarray) -> None:
        # one page a frame; no shaped-series description, so every reader sees plain pages
        self._tif.write(np.ascontiguousarray(frame), photometric="minisblack", metadata=None,
                        contiguous=False)

    def commit(self) -> None:
        self._tif.close()
        self._publish.__exit__(None, None, None)

    def abort(self) -> None:
        self._tif.close()
        self._publish.__exit__(_Abort, _Abort(), None)


class PngWriter:
    """One PNG per frame (image_io.frame_paths), each written atomically when it arrives."""

    def __init__(self, stem: Path, count: int, *, overwrite: bool = False):
        self.paths = frame_paths(stem, count, "png")
        if not overwrite:
            for path in self.paths:
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        self.overwrite, self.written = overwrite, []

    def write(self, frame: np.ndarray) -> None:
        k = len(self.written)
        if k >= len(self.paths):
            raise ValueError(f"{self.paths[0]}: more frames than the {len(self.paths)} announced")
        write_image(self.paths[k], [frame], "png", overwrite=self.overwrite)
        self.written.append(self.paths[k])

    def commit(self) -> None:
        if len(self.written) != len(self.paths):
            raise ValueError(f"{self.paths[0]}: {len(self.written)} of {len(self.paths)} frames written")

    def abort(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)


def open_writer(stem: Path, count: int, fmt: str, *, overwrite: bool = False):
    """A writer of `count` frames under `stem` in `fmt` ("tiff" or "png"; module docstring)."""
    if fmt == "tiff":
        return TiffWriter(frame_paths(stem, count, "tiff")[0], overwrite=overwrite)
    if fmt == "png":
        return PngWriter(stem, count, overwrite=overwrite)
    raise ValueError(f"unknown output format {fmt!r}; expected png or tiff")
