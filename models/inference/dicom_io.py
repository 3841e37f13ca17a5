"""DICOM in and out for speckle-denoise: a lazy frame source and a streaming derived-instance sink.

Reading (`DicomSource`): the header is read without the pixel data, checked, and the pixel data
element's extent checked against the file (a truncated file is refused before any frame is
decoded); frames are then decoded one at a time by pydicom's pixel handlers
(pydicom.pixels.iter_pixels: the file is read frame by frame, never whole), in the display
convention the writer keeps:

    MONOCHROME2                      gray, as stored
    MONOCHROME1                      gray, inverted: max - stored (high = bright)
    RGB, YBR_FULL, YBR_FULL_422,     RGB (pydicom converts YBR to RGB; JPEG 2000's YBR_ICT /
    YBR_ICT, YBR_RCT                 YBR_RCT come out of the decoder as RGB)
    PALETTE COLOR                    RGB through the palette (pydicom.pixels.apply_color_lut);
                                     16-bit palette entries that hold 8-bit values (all
                                     multiples of 256 or of 257, the common way) become 8 bits

Transfer syntaxes: whatever pydicom decodes with the installed plugins; the `dicom` extra
brings pylibjpeg with its libjpeg (JPEG baseline/extended/lossless, JPEG-LS), openjpeg (JPEG
2000, HTJ2K) and rle plugins. A syntax with no installed decoder is one line naming the
packages to install (DECODER_PACKAGES). Refused, each with one line naming the file: not DICOM
or corrupt, no pixel data (a structured report, a presentation state), float pixel data,
signed pixels, BitsAllocated other than 8 or 16, truncated pixel data, a tissue region outside
the image (regions.py).

Deflated Explicit VR Little Endian is the one syntax that cannot be read frame by frame (the
whole dataset is one zlib stream): it is decoded whole, and frame_io.check_resources counts
all its frames as in flight.

Writing (`DicomSink`): a derived instance of the input, streamed frame by frame into a temp
file beside the target and published by one rename (atomic_write.atomic_path): the input's
header (patient, study, equipment, frame timing, ultrasound regions, private tags) with a new
SOP Instance UID and Series Instance UID, ImageType DERIVED\\SECONDARY\\<the input's further
values>, a DerivationDescription (the network and the checkpoint's SHA-256), a Source Image
Sequence pointing at the input, the pixel module rewritten (MONOCHROME2 for gray input, RGB
interleaved for colour; BitsStored as read) and Explicit VR Little Endian (uncompressed) pixel
data whose length is known in advance, so frames go to disk as they come. A lossy input's
LossyImageCompression "01" is kept (set when the input's syntax was lossy but did not say so).
"""
from __future__ import annotations

import datetime
import os
import struct
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from speckle_models.atomic_write import atomic_path

DICOM_INSTALL = "pip install 'speckle-kernels[dicom]' (or: pip install pydicom)"
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
DECODER_PACKAGES = {  # transfer syntax UID -> the pip packages that decode it
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG,
    "1.2.840.10008.1.2.4.57": _LIBJPEG, "1.2.840.10008.1.2.4.70": _LIBJPEG,
    "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.92": _OPENJPEG, "1.2.840.10008.1.2.4.93": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG,
    "1.2.840.10008.1.2.4.203": _OPENJPEG, "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}
LOSSY_METHODS = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
                 "1.2.840.10008.1.2.4.81": "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
                 "1.2.840.10008.1.2.4.93": "ISO_15444_2", "1.2.840.10008.1.2.4.203": "ISO_15444_15"}
DEFLATED = "1.2.840.10008.1.2.1.99"  # the whole dataset is deflated: read into memory whole
COLOUR_KINDS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
GRAY_KINDS = ("MONOCHROME1", "MONOCHROME2")
_PALETTE_TAGS = [0x00281101, 0x00281102, 0x00281103, 0x00281199, 0x00281201, 0x00281202,
                 0x00281203, 0x00281221, 0x00281222, 0x00281223]


def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError as e:
        raise ModuleNotFoundError(f"{path} is a DICOM file; reading DICOM needs pydicom: "
                                  f"{DICOM_INSTALL}") from e
    return pydicom


def decoder_available(uid) -> bool:
    """Whether an installed pydicom plugin decodes this transfer syntax (tests patch it)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


class DicomSource:
    """The frames of one DICOM file, decoded lazily (module docstring). Attributes: path,
    kind "dicom", count, height, width, samples (1 or 3), max_value, dtype (of a frame),
    photometric (the input's), dataset (the header, no pixel data), region_boxes (raw
    (0018,6011) 2D tissue items, checked by regions.ultrasound_regions)."""

    kind = "dicom"

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        pydicom = _pydicom(path)
        from pydicom.errors import InvalidDicomError

        try:
            with open(path, "rb") as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                pixel_start = f.tell()
                self._check_pixel_extent(ds, f, pixel_start)
        except InvalidDicomError as e:
            raise ValueError(f"{path}: not a valid DICOM file ({e})") from e
        except (ValueError, NotImplementedError) as e:
            raise e if str(path) in str(e) else ValueError(f"{path}: corrupt DICOM file ({e})") from e
        except Exception as e:  # truncated header elements, bad lengths
            raise ValueError(f"{path}: corrupt DICOM file ({type(e).__name__}: {e})") from e
        self.dataset = ds
        self.transfer_syntax = ds.file_meta.TransferSyntaxUID
        self.photometric = str(ds.PhotometricInterpretation).strip()
        self.count = int(ds.get("NumberOfFrames", 1) or 1)
        self.height, self.width = int(ds.Rows), int(ds.Columns)
        self.samples = 1 if self.photometric in GRAY_KINDS else 3
        bits = int(ds.BitsStored)
        self.max_value = 2 ** bits - 1
        self._lut_divisor = 1
        if self.photometric == "PALETTE COLOR":
            self.max_value, self._lut_divisor = self._palette_scale(ds)
        self.dtype = np.dtype(np.uint8 if self.max_value <= 255 else np.uint16)
        self.streamable = self.transfer_syntax != DEFLATED  # else decoded whole (memory check)

    # ------------------------------------------------------------------ checks

    def _check_pixel_extent(self, ds, f, start: int) -> None:
        path = self.path
        deflated = ds.file_meta.TransferSyntaxUID == DEFLATED
        tag = None if deflated else _pixel_tag(f, start, ds)  # deflated: no raw file positions
        if not deflated and tag != 0x7FE00010:
            what = ("float pixel data (not supported: integer pixels only)"
                    if tag in (0x7FE00008, 0x7FE00009) else "no pixel data")
            sop = getattr(getattr(ds, "SOPClassUID", None), "name", "")
            raise ValueError(f"{path}: DICOM file with {what}" + (f" (a {sop})" if sop else ""))
        for key in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PhotometricInterpretation"):
            if key not in ds:
                raise ValueError(f"{path}: DICOM image without {key}")
        photometric = str(ds.PhotometricInterpretation).strip()
        if photometric not in GRAY_KINDS + COLOUR_KINDS:
            raise ValueError(f"{path}: photometric interpretation {photometric} is not supported "
                             f"({', '.join(GRAY_KINDS + COLOUR_KINDS)})")
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        if allocated not in (8, 16) or not 1 <= stored <= allocated:
            raise ValueError(f"{path}: unsupported bit depth: BitsAllocated {allocated}, BitsStored "
                             f"{stored} (8- and 16-bit pixel data are supported)")
        if int(ds.get("PixelRepresentation", 0)) != 0:
            raise ValueError(f"{path}: signed pixel data is not supported (unsigned 8-16 bit only)")
        uid = ds.file_meta.TransferSyntaxUID
        if uid.is_compressed and not decoder_available(uid):
            packages = DECODER_PACKAGES.get(str(uid))
            hint = (f"pip install {packages} (they come with the 'dicom' extra: pip install "
                    f"'speckle-kernels[dicom]')") if packages else "no decoder plugin is known for it"
            raise ValueError(f"{path}: its pixel data is {uid.name} ({uid}), which needs a decoder "
                             f"plugin that is not installed: {hint}")
        if deflated:  # checked when decoded (before anything is written)
            return
        # the pixel data element: tag, then (explicit VR) VR + length, or (implicit) length
        f.seek(start)
        head = f.read(12)
        little = uid.is_little_endian
        fmt = "<" if little else ">"
        if len(head) < 8:
            raise ValueError(f"{path}: truncated DICOM file (its pixel data element is cut off)")
        if uid.is_implicit_VR:
            length, value_start = struct.unpack(fmt + "I", head[4:8])[0], start + 8
        else:
            length, value_start = struct.unpack(fmt + "I", head[8:12])[0], start + 12
        size = os.fstat(f.fileno()).st_size
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames < 1:
            raise ValueError(f"{path}: NumberOfFrames is {frames}")
        if length == 0xFFFFFFFF:  # encapsulated: walk the item headers (no pixel bytes read)
            _check_fragments(f, value_start, size, fmt, path)
            return
        # as stored: palette indices are one sample; YBR_FULL_422 holds two samples a pixel
        samples = 2 if photometric == "YBR_FULL_422" else int(ds.get("SamplesPerPixel", 1))
        expected = frames * int(ds.Rows) * int(ds.Columns) * samples * int(ds.BitsAllocated) // 8
        if length < expected or value_start + expected > size:
            have = min(length, size - value_start)
            raise ValueError(f"{path}: truncated pixel data: {have} bytes for {frames} frame(s) of "
                             f"{ds.Rows}x{ds.Columns}x{samples} that need {expected}")

    @staticmethod
    def _palette_scale(ds) -> tuple[int, int]:
        """(max_value, divisor) of the RGB values the palette gives."""
        from pydicom.pixels import apply_color_lut

        entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        probe = apply_color_lut(np.arange(first, first + (entries or 65536), dtype=np.uint16), ds)
        if bits <= 8:
            return 255, 1
        for divisor in (257, 256):
            if not (probe % divisor).any() and probe.max() // divisor <= 255:
                return 255, divisor
        return 65535, 1

    # ------------------------------------------------------------------ frames

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.samples * self.dtype.itemsize

    def __iter__(self):
        """Each frame in turn: (H, W) gray or (H, W, 3) RGB, of self.dtype, display convention."""
        from pydicom.pixels import apply_color_lut, iter_pixels

        try:
            # a path: pydicom reads frame by frame; a deflated file is inflated whole first
            src = self.path if self.streamable else _pydicom(self.path).dcmread(self.path)
            for k, frame in enumerate(iter_pixels(src)):
                if self.photometric == "PALETTE COLOR":
                    frame = apply_color_lut(frame, self.dataset) // self._lut_divisor
                frame = np.minimum(frame, self.max_value).astype(self.dtype, copy=False)
                if self.photometric == "MONOCHROME1":
                    frame = self.max_value - frame
                if frame.shape != ((self.height, self.width) if self.samples == 1
                                   else (self.height, self.width, 3)):
                    raise ValueError(f"frame {k} has shape {frame.shape}")
                yield frame
        except (ValueError, RuntimeError, NotImplementedError, OSError, EOFError, AttributeError,
                KeyError) as e:
            why = " ".join(str(e).split()) or type(e).__name__  # pydicom lists each plugin's error
            raise ValueError(f"{self.path}: cannot decode its pixel data "
                             f"({self.transfer_syntax.name}): {why}") from e


def _check_fragments(f, position: int, size: int, fmt: str, path: Path) -> None:
    """Items (FFFE,E000) of known length up to the sequence delimiter (FFFE,E0DD), each inside
    the file: the offset table, then at least one fragment."""
    items = 0
    while True:
        f.seek(position)
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated compressed pixel data (no sequence delimiter "
                             f"after {max(items - 1, 0)} fragment(s))")
        group, element, length = struct.unpack(fmt + "HHI", head)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise ValueError(f"{path}: corrupt compressed pixel data (item tag "
                             f"({group:04X},{element:04X}) at byte {position})")
        position += 8 + length
        if position > size:
            raise ValueError(f"{path}: truncated compressed pixel data (fragment {items} runs "
                             f"{position - size} bytes past the end of the file)")
        items += 1
    if items < 2:
        raise ValueError(f"{path}: compressed pixel data without frames")


def _pixel_tag(f, start: int, ds) -> int | None:
    """The tag the header reading stopped at (a pixel data element), or None at the end."""
    f.seek(start)
    head = f.read(4)
    if len(head) < 4:
        return None
    fmt = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
    group, element = struct.unpack(fmt + "HH", head)
    return group << 16 | element


# ----------------------------------------------------------------------------- the derived instance

def derived_dataset(source: DicomSource, description: str):
    """The header of the derived instance (module docstring), without pixel data."""
    import copy

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    src = source.dataset
    ds = copy.deepcopy(src)
    for tag in [t for t in ds.keys() if t >= 0x7FE00000]:  # pixel data and anything after it
        del ds[tag]
    for tag in _PALETTE_TAGS:
        if tag in ds:
            del ds[tag]
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = generate_uid()
    image_type = list(src.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = description[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    ds.SourceImageSequence = Sequence([ref])
    series = src.get("SeriesDescription", "") or ""
    ds.SeriesDescription = (f"{series} despeckled" if series else "despeckled")[:64]
    now = datetime.datetime.now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ts = source.transfer_syntax
    if ts.is_compressed and str(ts) in LOSSY_METHODS and src.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = LOSSY_METHODS[str(ts)]
    colour = source.samples == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    bits = source.max_value.bit_length()
    ds.BitsAllocated = 8 * source.dtype.itemsize
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if source.photometric == "MONOCHROME1" and "WindowCenter" in ds:  # inverted with the pixels
        centers = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
        flipped = [source.max_value - float(c) for c in centers]
        ds.WindowCenter = flipped if len(flipped) > 1 else flipped[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = src.SOPClassUID
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


class DicomSink:
    """Writes a derived instance frame by frame: open(), write(frame) per frame, commit()
    (publishes the file at `path` in one rename) or abort() (removes the temp file). Also a
    context manager: commit on a clean exit, abort on an exception."""

    def __init__(self, path: Path, source: DicomSource, description: str, *, overwrite: bool = False):
        self.path, self.source, self.description, self.overwrite = Path(path), source, description, overwrite
        self.paths = [self.path]
        self._stack: ExitStack | None = None
        self._file = None
        self.written = 0
        self.dataset = None

    def open(self) -> "DicomSink":
        src = self.source
        self.dataset = derived_dataset(src, self.description)
        self._stack = ExitStack()
        try:
            tmp = self._stack.enter_context(atomic_path(self.path, overwrite=self.overwrite))
            self.dataset.save_as(tmp, enforce_file_format=True)
            self._file = self._stack.enter_context(open(tmp, "ab"))
            length = src.count * src.frame_bytes
            vr = b"OB" if src.dtype.itemsize == 1 else b"OW"
            self._file.write(struct.pack("<HH", 0x7FE0, 0x0010) + vr + b"\0\0"
                             + struct.pack("<I", length + length % 2))
        except BaseException:
            self.abort()
            raise
        return self

    def write(self, frame: np.ndarray) -> None:
        src = self.source
        shape = (src.height, src.width) if src.samples == 1 else (src.height, src.width, 3)
        if frame.shape != shape or frame.dtype != src.dtype:
            raise ValueError(f"{self.path}: frame of shape {frame.shape} {frame.dtype}; the instance "
                             f"holds {shape} {src.dtype}")
        if self.written >= src.count:
            raise ValueError(f"{self.path}: more than the {src.count} frames of the input")
        self._file.write(np.ascontiguousarray(frame, dtype=src.dtype.newbyteorder("<")).tobytes())
        self.written += 1

    def commit(self) -> list[Path]:
        if self.written != self.source.count:
            self.abort()
            raise ValueError(f"{self.path}: {self.written} of {self.source.count} frames written")
        if (self.source.count * self.source.frame_bytes) % 2:
            self._file.write(b"\0")
        stack, self._stack = self._stack, None
        stack.close()  # closes the file, fsyncs and renames (atomic_path)
        return self.paths

    def abort(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(_Aborted, _Aborted(), None)  # atomic_path removes the temp file

    def __enter__(self):
        return self.open()

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False


class _Aborted(Exception):
    """Thrown into the atomic writer to make it discard its temp file."""
