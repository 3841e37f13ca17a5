"""Bad DICOM input is one line naming the file and the problem, and nothing is written; cines
stream in memory bounded by the batch.

Every refusal runs through the CLI: exit status 2, one stderr line containing the file's name
and the problem, no traceback, and an output folder that does not exist or is empty (no
output, no temp file). The memory bound is measured with tracemalloc (numpy's buffers are
traced; torch's are not, and are the network's, bounded by the batch and max_pixels anyway):
the peak of a 160-frame cine stays within 1.5x that of a 16-frame one and below half the
cine's decoded size.
"""
import json
import tracemalloc

import numpy as np
import pytest

from speckle_models.inference import dicom_io, frame_io
from tests import dicom_fixtures as fx
from tests.dicom_fixtures import pydicom
from tests.denoise_helpers import cli_captured as cli, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", "br-unet")


def refused(ckpt, capsys, tmp_path, path, *words, extra=()):
    out = tmp_path / "out"
    rc, _, err = cli([ckpt, path, "--out", out, *extra], capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    return err


def gray_file(tmp_path, name="g.dcm", frames=1, **attrs):
    rng = np.random.default_rng(30)
    gray, _ = fx.scanner_frame(rng, colour=False)
    ds = fx.base_dataset(np.stack([gray] * frames), "MONOCHROME2")
    for key, value in attrs.items():
        setattr(ds, key, value)
    return fx.save(ds, tmp_path / name)


def test_corrupt_and_truncated_files(tmp_path, ckpt, capsys):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    refused(ckpt, capsys, tmp_path, garbage, "DICOM")
    good = gray_file(tmp_path).read_bytes()
    head = tmp_path / "head.dcm"
    head.write_bytes(good[:300])  # cut inside the header
    refused(ckpt, capsys, tmp_path, head)
    native = tmp_path / "native.dcm"
    native.write_bytes(good[:-1000])  # cut inside the pixel data
    refused(ckpt, capsys, tmp_path, native, "truncated pixel data")
    rng = np.random.default_rng(31)
    cine = np.stack([fx.scanner_frame(rng)[0] for _ in range(3)])
    rle = fx.save(fx.compressed(fx.base_dataset(cine, "RGB"), cine, fx.RLELossless), tmp_path / "rle.dcm")
    cut = tmp_path / "rle_cut.dcm"
    cut.write_bytes(rle.read_bytes()[:-500])
    refused(ckpt, capsys, tmp_path, cut, "truncated compressed pixel data")


def test_damaged_last_frame_aborts_the_stream(tmp_path, ckpt, capsys):
    """The header and the first frame are fine, the third frame's data is not: frames 0 and 1
    were already streamed into the temp file when the error comes, and it is removed."""
    from pydicom.encaps import encapsulate, generate_frames

    rng = np.random.default_rng(32)
    cine = np.stack([fx.scanner_frame(rng)[0] for _ in range(3)])
    ds = fx.compressed(fx.base_dataset(cine, "RGB"), cine, fx.RLELossless)
    frames = list(generate_frames(ds.PixelData, number_of_frames=3))
    frames[2] = frames[2][:64] + b"\x7f" * (len(frames[2]) - 64)  # the RLE segments run wild
    ds.PixelData = encapsulate(frames)
    path = fx.save(ds, tmp_path / "damaged.dcm")
    refused(ckpt, capsys, tmp_path, path, "cannot decode", extra=("--region", "24,16,60,96", "--batch-size", "1"))


@pytest.mark.parametrize("attrs,words", [
    ({"BitsAllocated": 32, "BitsStored": 32, "HighBit": 31}, ("unsupported bit depth", "BitsAllocated 32")),
    ({"BitsAllocated": 1, "BitsStored": 1, "HighBit": 0}, ("unsupported bit depth", "BitsAllocated 1")),
    ({"PixelRepresentation": 1}, ("signed pixel data",)),
    ({"PhotometricInterpretation": "HSV"}, ("photometric interpretation HSV",)),
])
def test_unsupported_pixel_formats(tmp_path, ckpt, capsys, attrs, words):
    refused(ckpt, capsys, tmp_path, gray_file(tmp_path, **attrs), *words)


def test_files_without_integer_pixels(tmp_path, ckpt, capsys):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BasicTextSRStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = Dataset()
    sr.file_meta = meta
    sr.SOPClassUID, sr.SOPInstanceUID, sr.Modality = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID, "SR"
    sr.ValueType = "CONTAINER"
    path = fx.save(sr, tmp_path / "report.dcm")
    refused(ckpt, capsys, tmp_path, path, "no pixel data", "Basic Text SR")
    ds = fx.base_dataset(np.zeros((1, 32, 32), np.uint8), "MONOCHROME2")
    del ds.PixelData
    ds.BitsAllocated = ds.BitsStored = 32
    ds.FloatPixelData = np.zeros((32, 32), np.float32).tobytes()
    refused(ckpt, capsys, tmp_path, fx.save(ds, tmp_path / "float.dcm"), "float pixel data")


def test_missing_decoder_names_the_plugin(tmp_path, ckpt, capsys, monkeypatch):
    rng = np.random.default_rng(33)
    rgb, _ = fx.scanner_frame(rng)
    path = fx.save(fx.compressed(fx.base_dataset(rgb[None], "RGB"), rgb[None], fx.JPEG2000Lossless),
                   tmp_path / "j2k.dcm")
    monkeypatch.setattr(dicom_io, "decoder_available", lambda uid: False)
    refused(ckpt, capsys, tmp_path, path, "JPEG 2000", "pip install pylibjpeg pylibjpeg-openjpeg", "'dicom' extra")


def test_a_bad_file_among_good_ones_writes_nothing(tmp_path, ckpt, capsys):
    good = gray_file(tmp_path, "a_good.dcm")
    bad = gray_file(tmp_path, "b_bad.dcm", PixelRepresentation=1)
    out = tmp_path / "out"
    rc, _, err = cli([ckpt, good, bad, "--out", out], capsys)
    assert rc == 2 and "b_bad.dcm" in err and not out.exists()


def test_memory_and_disk_are_checked_before_writing(tmp_path, ckpt, capsys, monkeypatch):
    path = gray_file(tmp_path, frames=4)
    monkeypatch.setattr(frame_io, "available_memory", lambda: 100_000)
    refused(ckpt, capsys, tmp_path, path, "of memory", "lower --batch-size")
    monkeypatch.setattr(frame_io, "available_memory", lambda: 1 << 40)
    monkeypatch.setattr(frame_io, "free_disk", lambda folder: 1000)
    refused(ckpt, capsys, tmp_path, path, "GiB free")


def test_a_deflated_cine_is_decoded_whole_so_memory_counts_every_frame(tmp_path, ckpt, capsys, monkeypatch):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    rng = np.random.default_rng(35)
    frames = np.stack([fx.scanner_frame(rng, colour=False)[0] for _ in range(12)])
    ds = fx.base_dataset(frames, "MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = fx.save(ds, tmp_path / "deflated.dcm")
    source = frame_io.open_source(path)
    assert not source.streamable and np.array_equal(np.stack(list(source)), frames)
    per_frame = 2 * source.frame_bytes + source.height * source.width * frame_io.BYTES_PER_PIXEL_IN_FLIGHT
    monkeypatch.setattr(frame_io, "available_memory", lambda: 6 * per_frame)  # a batch of 2 fits, 12 do not
    refused(ckpt, capsys, tmp_path, path, "12 frame(s)", "stream 12 at a time", extra=("--batch-size", "2"))


def _peak_bytes(ckpt, capsys, path, out) -> tuple[int, dict]:
    tracemalloc.start()
    try:
        rc, stdout, err = cli([ckpt, path, "--out", out, "--region", "8,8,48,48", "--batch-size", "2"], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 0, err
    return peak, json.loads(stdout)


def test_a_cine_streams_in_memory_bounded_by_the_batch(tmp_path, ckpt, capsys, monkeypatch):
    rng = np.random.default_rng(34)
    frame = np.rint(fx.speckle_frame(rng, 192, 192) * 255).astype(np.uint8)
    warm = fx.save(fx.base_dataset(np.stack([frame] * 2), "MONOCHROME2"), tmp_path / "warm.dcm")
    short = fx.save(fx.base_dataset(np.stack([frame] * 16), "MONOCHROME2"), tmp_path / "short.dcm")
    long_frames = np.stack([np.roll(frame, k, axis=1) for k in range(160)])
    long = fx.save(fx.base_dataset(long_frames, "MONOCHROME2"), tmp_path / "long.dcm")
    decoded = long_frames.nbytes  # 5.9 MB
    # less memory than the cine decodes to, more than the frames in flight: it runs
    monkeypatch.setattr(frame_io, "available_memory", lambda: decoded * 3 // 4)
    _peak_bytes(ckpt, capsys, warm, tmp_path / "o0")  # imports and first-call caches
    peak_short, _ = _peak_bytes(ckpt, capsys, short, tmp_path / "o1")
    peak_long, summary = _peak_bytes(ckpt, capsys, long, tmp_path / "o2")
    assert summary["frames"] == 160 and summary["frames_per_s"] > 0
    assert peak_long < 1.5 * peak_short, (peak_long, peak_short)
    # the peak stays within what frame_io.check_resources budgets for the frames in flight (a
    # batch of 2 and 2 in each of the decode and write queues), well below the decoded cine
    budget = (2 + 2 * 2) * (2 * frame.nbytes + frame.size * frame_io.BYTES_PER_PIXEL_IN_FLIGHT)
    assert peak_long < budget < 0.7 * decoded, (peak_long, budget, decoded)
    written = pydicom.dcmread(tmp_path / "o2" / "long.dcm").pixel_array
    assert written.shape == long_frames.shape
    outside = np.ones((192, 192), bool)
    outside[8:56, 8:56] = False
    assert np.array_equal(written[:, outside], long_frames[:, outside])
    assert not np.array_equal(written[:, 8:56, 8:56], long_frames[:, 8:56, 8:56])
