"""Helpers shared by the speckle-denoise tests: small random networks and checkpoints in
speckle-train's format, the network run directly, the CLI in-process, and the one-code bound."""
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models import build_model
from speckle_models.inference import denoise as D
from speckle_models.inference import engine as E
from speckle_models.networks.fold import norm_modules
from speckle_models.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from speckle_models.training.config import TrainConfig


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    """Width 4, random weights, eval norms that are not the identity."""
    torch.manual_seed(seed)
    model = build_model(name, width=4)
    with torch.no_grad():
        for _, norm in norm_modules(model):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
            norm.running_mean.normal_(0.0, 0.2)
            stat = norm.running_var if hasattr(norm, "running_var") else norm.running_std
            stat.uniform_(0.5, 2.0)
    return model.eval()


def save_checkpoint(path: Path, name: str, network=None, **config) -> Path:
    """A checkpoint in speckle-train's format; config entries override the saved TrainConfig."""
    network = network if network is not None else random_model(name)
    cfg = asdict(TrainConfig(model=name, out="run", width=4).resolved())
    cfg.update(config)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": cfg,
                "epoch": 1, "model": network.state_dict(), "optimizer": {}, "rng": {}, "history": []},
               path)
    return path


def direct(model, v: np.ndarray) -> np.ndarray:
    """The network on the whole image as training feeds it, back to v in [0, 1]."""
    with torch.no_grad():
        y = model((torch.from_numpy(v)[None, None] - 0.5) / 0.5)
    return (y.clamp(-1, 1) * 0.5 + 0.5)[0, 0].numpy()


def _main(argv) -> int:
    """speckle-denoise's main(argv) in-process, without its progress bar: the exit status."""
    try:
        return D.main([*map(str, argv), "--no-progress"])
    except SystemExit as e:
        return e.code


def cli(argv, capsys=None):
    """main(argv) -> (exit status, stderr)."""
    rc = _main(argv)
    return rc, capsys.readouterr().err if capsys else ""


def cli_captured(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr); stdout's last line is the summary."""
    rc = _main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_code(got: np.ndarray, expected: np.ndarray, precision: str) -> None:
    """Written codes against the network's float output on the file's scale: on an fp32 path
    every pixel within one code (module docstring); on a bf16 path (the default on a CPU with
    native bf16, 8-bit outputs only) the engine's bar: AGREEMENT_BAR of the pixels within one
    grey level, i.e. within 1.5 of the unrounded value."""
    off = np.abs(got.astype(np.float64) - expected)
    if precision == "fp32":
        assert off.max() <= 1.0
    else:
        assert (off <= 1.5).mean() >= E.AGREEMENT_BAR


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def dicom_file(path: Path, frames: np.ndarray, bits_stored: int, *, photometric="MONOCHROME2",
               transfer_syntax=None) -> Path:
    pydicom = pytest.importorskip("pydicom", reason="DICOM needs pydicom (pip install pydicom)")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if frames.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes() if transfer_syntax is None else pydicom.encaps.encapsulate(
        [b"\xff\xd8 not really jpeg-ls \xff\xd9"] * len(frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
