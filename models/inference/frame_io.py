"""Frame sources and frame sinks: how speckle-denoise streams a file through the network.

A frame SOURCE is one input file, opened cheaply (the header only) and iterated lazily:

    source = open_source(path)        # DicomSource (dicom_io.py) or PillowSource (below)
    source.path, source.kind          # "dicom" | "png" | "jpeg" | "tiff"
    source.count, source.height, source.width, source.samples (1 gray | 3 RGB)
    source.max_value, source.dtype    # v = pixels / max_value; frames are uint8 or uint16
    source.frame_bytes                # one decoded frame
    source.streamable                 # False where the file must be decoded whole (deflated DICOM)
    for frame in source: ...          # (H, W) or (H, W, 3), decoded one at a time, display
                                      # convention (high = bright, RGB for every colour kind)

A frame SINK is one output, written frame by frame and published atomically:

    sink = make_sink(fmt, stem, source, description, overwrite=...)   # DicomSink, PngSink, TiffSink
    sink.open(); sink.write(frame) for each frame; sink.commit() -> the published paths
    sink.abort()                      # on any error: nothing is left, under any name
    (or: with sink: ...  -- commit on a clean exit, abort on an exception)

The pipeline (tissue.stream_file): `prefetch` decodes in one thread up to a batch ahead,
`WriteBehind` encodes and writes in another, the network runs in between; frames stay in order.

Memory is then bounded by the frames in flight (the two queues and one batch), not by the
file: `check_resources` refuses, before any work, a run whose batch does not fit in the
available memory, or whose output does not fit on the output's disk.

Output files: DICOM in -> a derived DICOM instance (stem.dcm, dicom_io.DicomSink) by default;
PNG: stem.png for one frame, stem.f0000.png, stem.f0001.png, ... for a cine (all published at
commit); TIFF: one multi-page stem.tif (tifffile, page by page). Gray frames are written as
8- or 16-bit gray, colour frames as 8-bit RGB (16-bit colour goes to TIFF or DICOM only).
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from speckle_models.atomic_write import atomic_path
from speckle_models.inference import image_io

OUTPUT_FORMATS = {"dicom": ".dcm", "png": ".png", "tiff": ".tif"}
_PIL_KINDS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}


class PillowSource:
    """PNG, JPEG and TIFF (multi-page, animated PNG) frames through Pillow, page by page."""

    def __init__(self, path: str | os.PathLike):
        from PIL import Image, UnidentifiedImageError

        self.path = path = Path(path)
        try:
            with Image.open(path) as im:
                self.kind = _PIL_KINDS.get(im.format or "")
                if self.kind is None:
                    raise ValueError(f"{path}: unsupported image format {im.format} "
                                     "(speckle-denoise reads PNG, JPEG, TIFF and DICOM)")
                self.count = getattr(im, "n_frames", 1)
                self.width, self.height = im.size
                first = self._pixels(im)
        except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"{path}: not a readable PNG, JPEG or TIFF image "
                             f"({type(e).__name__}: {e})") from e
        self.streamable = True  # pages are decoded one at a time
        self.samples = 1 if first.ndim == 2 else 3
        self.dtype = first.dtype
        self.max_value = 255 if first.dtype == np.uint8 else 65535

    def _pixels(self, im) -> np.ndarray:
        """One page as uint8/uint16 gray or uint8 RGB (image_io's modes and refusals)."""
        mode = im.mode
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        if mode == "I":
            a = np.asarray(im)
            if a.size and (a.min() < 0 or a.max() > 65535):
                raise ValueError(f"{self.path}: 32-bit integer pixels outside 0..65535 are not supported")
            return a.astype(np.uint16)
        if mode == "F":
            raise ValueError(f"{self.path}: 32-bit float pixels are not supported (8- or 16-bit images only)")
        if mode in ("L", "LA", "La", "1"):
            return np.asarray(im.convert("L") if mode == "1" else im.getchannel(0), dtype=np.uint8)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # palette, RGBA, CMYK, YCbCr...

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.samples * self.dtype.itemsize

    def __iter__(self):
        from PIL import Image, ImageSequence

        try:
            with Image.open(self.path) as im:
                for k, page in enumerate(ImageSequence.Iterator(im)):
                    frame = self._pixels(page)
                    if frame.shape[:2] != (self.height, self.width) or frame.dtype != self.dtype \
                            or frame.ndim != (2 if self.samples == 1 else 3):
                        raise ValueError(f"{self.path}: page {k} differs from the first in size, "
                                         "bit depth or colour (every page must match)")
                    yield frame
        except (OSError, SyntaxError, EOFError) as e:
            raise ValueError(f"{self.path}: not a readable image ({type(e).__name__}: {e})") from e


def open_source(path: str | os.PathLike):
    """The frame source of one file (DICOM sniffed by its preamble or suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    if image_io.is_dicom(path):
        from speckle_models.inference.dicom_io import DicomSource

        return DicomSource(path)
    return PillowSource(path)


# ----------------------------------------------------------------------------- sinks

class _AtomicSink:
    """open / write / commit / abort over one or more atomic_path temp files."""

    def __init__(self, paths: list[Path], *, overwrite: bool):
        self.paths, self.overwrite = paths, overwrite
        self._stack: ExitStack | None = None
        self.written = 0

    def _enter(self, path: Path) -> Path:
        return self._stack.enter_context(atomic_path(path, overwrite=self.overwrite))

    def open(self):
        self._stack = ExitStack()
        return self

    def commit(self) -> list[Path]:
        stack, self._stack = self._stack, None
        stack.close()
        return self.paths

    def abort(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self):
        return self.open()

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False


class _Aborted(Exception):
    """Thrown into the atomic writers to make them discard their temp files."""


class PngSink(_AtomicSink):
    """stem.png, or stem.f0000.png ... for several frames; published together at commit."""

    def __init__(self, stem: Path, count: int, *, overwrite: bool = False):
        super().__init__(png_paths(stem, count), overwrite=overwrite)

    def write(self, frame: np.ndarray) -> None:
        with open(self._enter(self.paths[self.written]), "xb") as f:
            image_io._encode(f, [frame], "png")
        self.written += 1


class TiffSink(_AtomicSink):
    """One multi-page TIFF, page by page (tifffile: pages go to disk as they come)."""

    def __init__(self, stem: Path, *, overwrite: bool = False):
        super().__init__([stem.with_name(stem.name + ".tif")], overwrite=overwrite)
        self._writer = None

    def open(self):
        import tifffile

        super().open()
        try:
            self._writer = self._stack.enter_context(tifffile.TiffWriter(self._enter(self.paths[0])))
        except BaseException:
            self.abort()
            raise
        return self

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame, photometric="rgb" if frame.ndim == 3 else "minisblack",
                           contiguous=False, metadata=None)
        self.written += 1


def png_paths(stem: Path, count: int) -> list[Path]:
    if count == 1:
        return [stem.with_name(stem.name + ".png")]
    return [stem.with_name(f"{stem.name}.f{i:04d}.png") for i in range(count)]


def output_paths(fmt: str, stem: Path, count: int) -> list[Path]:
    return png_paths(stem, count) if fmt == "png" else [stem.with_name(stem.name + OUTPUT_FORMATS[fmt])]


def check_output(fmt: str, source) -> None:
    """ValueError naming the file when `fmt` cannot hold its frames."""
    if fmt == "dicom" and source.kind != "dicom":
        raise ValueError(f"{source.path}: --format dicom needs a DICOM input (this is {source.kind}); "
                         "use --format png or tiff")
    if fmt == "png" and source.samples == 3 and source.max_value > 255:
        raise ValueError(f"{source.path}: 16-bit colour cannot be written as PNG; use --format tiff or dicom")


def make_sink(fmt: str, stem: Path, source, description: str, *, overwrite: bool = False):
    """The sink of one output (module docstring), checked by check_output."""
    check_output(fmt, source)
    if fmt == "dicom":
        from speckle_models.inference.dicom_io import DicomSink

        return DicomSink(stem.with_name(stem.name + ".dcm"), source, description, overwrite=overwrite)
    if fmt == "png":
        return PngSink(stem, source.count, overwrite=overwrite)
    return TiffSink(stem, overwrite=overwrite)


# ----------------------------------------------------------------------------- resources

def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; tests patch it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_disk(folder: Path) -> int:
    """Bytes free on the disk that holds `folder` (its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


# The run's memory per frame in flight: the decoded frame and the written one (2 frame_bytes),
# and per pixel its float32 gray level, output and the overlay masks (16 bytes); the crops and
# the network's activations come on top, bounded by the regions and max_pixels, not the cine.
BYTES_PER_PIXEL_IN_FLIGHT = 16


def check_resources(source, *, batch: int, prefetch: int, out_dir: Path, output_bytes: int) -> None:
    """One line naming the file when its frames in flight (a batch, and `prefetch` frames in
    each of the decode and write queues; every frame of a source that is not streamable) do not
    fit in memory, or its output does not fit on disk (checked before anything is written)."""
    gib = 2.0 ** 30
    in_flight = min(source.count, batch + 2 * prefetch) if getattr(source, "streamable", True) else source.count
    need = in_flight * (2 * source.frame_bytes + source.height * source.width * BYTES_PER_PIXEL_IN_FLIGHT)
    have = available_memory()
    if need > have:
        whole = source.count * source.frame_bytes
        raise ValueError(f"{source.path}: {source.count} frame(s) of {source.height}x{source.width} "
                         f"({whole / gib:.2f} GiB decoded) stream {in_flight} at a time, which needs "
                         f"{need / gib:.2f} GiB of memory; {have / gib:.2f} GiB is available "
                         "(lower --batch-size)")
    free = free_disk(out_dir)
    if output_bytes > free:
        raise ValueError(f"{source.path}: its output needs {output_bytes / gib:.2f} GiB; "
                         f"{out_dir} has {free / gib:.2f} GiB free")


def prefetch(iterable, depth: int, busy=None):
    """Iterate `iterable` in a background thread, at most `depth` items ahead (decode of the
    next frames while the network runs on this batch). Exceptions surface in the consumer.
    busy(seconds): called with the time each item took to produce (the decode stage's time)."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in timed(iterable, busy):
                if stop.is_set():
                    return
                items.put((item, None))
            items.put((done, None))
        except BaseException as e:  # handed to the consumer
            items.put((done, e))

    thread = threading.Thread(target=work, daemon=True, name="speckle-decode")
    thread.start()
    try:
        while True:
            item, error = items.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def timed(iterable, busy=None):
    """Iterate `iterable`, calling busy(seconds) with each item's production time."""
    if busy is None:
        yield from iterable
        return
    it = iter(iterable)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            busy(time.perf_counter() - t0)
        yield item


class WriteBehind:
    """Frames handed to a sink's write() in a background thread, at most `depth` queued (encode
    of this batch while the network runs on the next). close() waits for the queue and raises
    the writer's error, if any; after an error further writes raise it at once. busy(seconds):
    called with each write's time (the encode stage's)."""

    def __init__(self, sink, depth: int, busy=None):
        self.sink, self._busy = sink, busy
        self._items: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True, name="speckle-encode")
        self._thread.start()

    def _work(self) -> None:
        while True:
            frame = self._items.get()
            if frame is None:
                return
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    self.sink.write(frame)
                except BaseException as e:  # handed to the producer
                    self._error = e
                if self._busy is not None:
                    self._busy(time.perf_counter() - t0)

    def write(self, frame: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._items.put(frame)

    def close(self) -> None:
        self._items.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
