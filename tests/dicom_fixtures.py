"""DICOM files for the tests, written with pydicom: every photometric kind, the transfer syntaxes
that pydicom (RLE, JPEG 2000 through pylibjpeg-openjpeg) or Pillow (JPEG baseline) can encode,
ultrasound regions, cines; and speckle-like frames with text, colour and white marks.

Syntaxes without an encoder here (JPEG extended and lossless, JPEG-LS) come from the files
pydicom ships in pydicom/data/test_files (`shipped`), which are decoded by the same plugins.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM needs pydicom (pip install 'speckle-kernels[dicom]')")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, ExplicitVRLittleEndian,  # noqa: E402
                         RLELossless, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage,
                         generate_uid)

STUDY = {"PatientName": "Test^Speckle", "PatientID": "SPK-001", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1",
         "Manufacturer": "Speckle Phantom Co", "ManufacturerModelName": "P-1", "StationName": "CI",
         "StudyDate": "20261203", "AccessionNumber": "A1"}


def speckle_frame(rng, h: int, w: int, *, mean: float = 0.45) -> np.ndarray:
    """Log-compressed fully developed speckle, v in [0, 1] (float32): 20 log10 of a Rayleigh
    envelope mapped from 40 dB of dynamic range."""
    envelope = rng.rayleigh(1.0, (h, w))
    db = 20 * np.log10(np.maximum(envelope, 1e-3))
    return np.clip(mean + db / 40.0, 0.02, 1.0).astype(np.float32)


def scanner_frame(rng, h: int = 96, w: int = 128, *, colour: bool = True) -> tuple[np.ndarray, tuple]:
    """(an 8-bit (H, W, 3) or (H, W) frame, the tissue box T,L,H,W): black background, a
    rectangle of speckle, text-like strokes at the top, and (colour) a red Doppler patch and a
    white line inside the tissue."""
    box = (24, 16, h - 36, w - 32)
    v = np.zeros((h, w), np.float32)
    t, l, bh, bw = box
    v[t:t + bh, l:l + bw] = speckle_frame(rng, bh, bw)
    v[3:11, 6:60:4] = 1.0  # strokes: a "text" line
    v[3:11, 6:60] = np.where(np.arange(6, 60) % 4 == 0, 1.0, 0.0)[None]
    gray = np.rint(v * 255).astype(np.uint8)
    if not colour:
        return gray, box
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[t + 10:t + 20, l + 10:l + 30] = (200, 30, 20)  # Doppler
    rgb[t + bh - 8, l + 4:l + bw - 4] = 255  # a white caliper line
    return rgb, box


def region_item(box: tuple, *, spatial: int = 1, data_type: int = 1) -> Dataset:
    t, l, h, w = box
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = spatial, data_type, 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = l, t
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = l + w - 1, t + h - 1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = item.PhysicalDeltaY = 0.01
    return item


def base_dataset(frames: np.ndarray, photometric: str, *, bits_stored: int | None = None) -> Dataset:
    """A US image dataset around (N, H, W) or (N, H, W, 3) uint8/uint16 frames (native)."""
    multi = len(frames) > 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in STUDY.items():
        setattr(ds, key, value)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "US", generate_uid(), 1, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.Rows, ds.Columns = frames.shape[1:3]
    colour = frames.ndim == 4
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * frames.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if multi:
        ds.NumberOfFrames, ds.FrameTime = len(frames), 33.3
        ds.FrameIncrementPointer = 0x00181063
    ds.PixelData = frames.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def with_regions(ds: Dataset, *items: Dataset) -> Dataset:
    ds.SequenceOfUltrasoundRegions = Sequence(list(items))
    return ds


def rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    return convert_color_space(rgb, "RGB", "YBR_FULL")


def palette_dataset(frames_rgb: np.ndarray, *, lut_bits: int = 16) -> tuple[Dataset, np.ndarray]:
    """PALETTE COLOR from 8-bit RGB frames: the palette is the frames' distinct colours.
    Returns the dataset and the RGB frames it displays as (8-bit)."""
    flat = frames_rgb.reshape(-1, 3)
    colours, index = np.unique(flat, axis=0, return_inverse=True)
    assert len(colours) <= 256, "palette fixtures need at most 256 colours"
    indices = index.reshape(frames_rgb.shape[:-1]).astype(np.uint8)
    ds = base_dataset(indices, "PALETTE COLOR")
    scale = 257 if lut_bits == 16 else 1
    for k, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(colours), 0, lut_bits])
        data = (colours[:, k].astype(np.uint16) * scale).astype("<u2" if lut_bits == 16 else np.uint8)
        if lut_bits == 8 and len(data) % 2:
            data = np.append(data, 0)
        setattr(ds, f"{name}PaletteColorLookupTableData", data.tobytes())
    return ds, colours[index].reshape(frames_rgb.shape).astype(np.uint8)


def jpeg_baseline(frames_rgb: np.ndarray, *, subsampling: int) -> Dataset:
    """JPEG baseline frames encoded by Pillow (YCbCr; subsampling 1 = 4:2:2 -> YBR_FULL_422,
    0 = 4:4:4 -> YBR_FULL), encapsulated by pydicom."""
    from PIL import Image

    fragments = []
    for frame in frames_rgb:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95, subsampling=subsampling)
        fragments.append(buf.getvalue())
    ds = base_dataset(frames_rgb, "YBR_FULL_422" if subsampling == 1 else "YBR_FULL")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def compressed(ds: Dataset, frames: np.ndarray, syntax, **kw) -> Dataset:
    ds.compress(syntax, frames if len(frames) > 1 else frames[0], **kw)
    return ds


def shipped(name: str) -> Path:
    """One of pydicom's own test files (pydicom/data/test_files)."""
    return Path(pydicom.__file__).parent / "data" / "test_files" / name


__all__ = ["JPEG2000", "JPEG2000Lossless", "RLELossless", "base_dataset", "compressed", "jpeg_baseline",
           "palette_dataset", "region_item", "rgb_to_ybr_full", "save", "scanner_frame", "shipped",
           "speckle_frame", "with_regions"]
