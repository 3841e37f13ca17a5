"""speckle-denoise on scanner DICOM: every photometric kind and transfer syntax in, a derived
instance out, only the tissue changed, cines streamed, bad files refused in one line.

Fixtures are written with pydicom (tests/dicom_fixtures.py); syntaxes nothing here can encode
(JPEG extended/lossless, JPEG-LS) come from pydicom's own test files, and pydicom.examples
gives four real scanner files (tests skip, with the reason, where a decoder plugin is missing).
The network is a width-4 Br-U-Net with random weights: what is tested is where its output
goes, not how good it is.

Exact comparisons: pixels outside the tissue are compared bit for bit with pydicom's own
decode of the input (in the display convention: MONOCHROME1 inverted, palette applied, YBR
converted to RGB). Inside a gray rectangle region the output is the network's on the region
padded by numpy's reflect mode, rounded: allowed one code (the two fp32 runs may round apart).
"""
import json
import shutil
import subprocess

import numpy as np
import pytest

from speckle_models.inference import denoise as D
from speckle_models.inference import dicom_io, frame_io, regions
from speckle_models.inference.image_io import gray_level
from tests.denoise_helpers import cli_captured as cli, direct, save_checkpoint

from tests import dicom_fixtures as fx
from tests.dicom_fixtures import pydicom

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", "br-unet")


def display_pixels(path) -> np.ndarray:
    """pydicom's own decode, in the display convention, (N, H, W[, 3])."""
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        a = apply_color_lut(a, ds)
        a = a // 257 if not (a % 257).any() else (a // 256 if not (a % 256).any() else a)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = (2 ** ds.BitsStored - 1) - a
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        a = a[None]
    return a


def needs_decoder(path):
    uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if uid.is_compressed and not dicom_io.decoder_available(uid):
        pytest.skip(f"no decoder plugin for {uid.name} installed ({dicom_io.DECODER_PACKAGES.get(str(uid))})")


# ----------------------------------------------------------------------------- fixtures of every kind

def _fixtures(tmp, rng):
    """name -> (path, expected display frames or None (compare with pydicom's decode), box)."""
    out = {}
    rgb, box = fx.scanner_frame(rng)
    gray, _ = fx.scanner_frame(rng, colour=False)
    cine = np.stack([fx.scanner_frame(rng)[0] for _ in range(3)])
    gray12 = (gray.astype(np.uint16) * 16)[None]  # 12 bits stored in 16
    out["mono2_8"] = (fx.save(fx.base_dataset(gray[None], "MONOCHROME2"), tmp / "mono2_8.dcm"), gray[None], box)
    out["mono2_12"] = (fx.save(fx.base_dataset(gray12, "MONOCHROME2", bits_stored=12), tmp / "mono2_12.dcm"),
                       gray12, box)
    out["mono1_12"] = (fx.save(fx.base_dataset(4095 - gray12, "MONOCHROME1", bits_stored=12), tmp / "mono1.dcm"),
                       gray12, box)
    out["rgb"] = (fx.save(fx.base_dataset(rgb[None], "RGB"), tmp / "rgb.dcm"), rgb[None], box)
    out["ybr_full"] = (fx.save(fx.base_dataset(fx.rgb_to_ybr_full(rgb)[None], "YBR_FULL"), tmp / "ybr_full.dcm"),
                       None, box)
    pal, pal_rgb = fx.palette_dataset(rgb[None], lut_bits=16)
    out["palette16"] = (fx.save(pal, tmp / "palette16.dcm"), pal_rgb, box)
    pal8, pal8_rgb = fx.palette_dataset(rgb[None], lut_bits=8)
    out["palette8"] = (fx.save(pal8, tmp / "palette8.dcm"), pal8_rgb, box)
    out["rle_gray_cine"] = (fx.save(fx.compressed(fx.base_dataset(np.stack([gray] * 2), "MONOCHROME2"),
                                                  np.stack([gray] * 2), fx.RLELossless), tmp / "rle_gray.dcm"),
                            np.stack([gray] * 2), box)
    out["rle_rgb_cine"] = (fx.save(fx.compressed(fx.base_dataset(cine, "RGB"), cine, fx.RLELossless),
                                   tmp / "rle_rgb.dcm"), cine, box)
    j2k = fx.compressed(fx.base_dataset(rgb[None], "RGB"), rgb[None], fx.JPEG2000Lossless, use_mct=True)
    j2k.PhotometricInterpretation = "YBR_RCT"  # the codestream holds the reversible colour transform
    out["j2k_ybr_rct"] = (fx.save(j2k, tmp / "j2k_rct.dcm"), rgb[None], box)
    ict = fx.compressed(fx.base_dataset(rgb[None], "RGB"), rgb[None], fx.JPEG2000, use_mct=True, j2k_psnr=[50])
    ict.PhotometricInterpretation = "YBR_ICT"
    out["j2k_ybr_ict"] = (fx.save(ict, tmp / "j2k_ict.dcm"), None, box)
    out["j2k_gray12"] = (fx.save(fx.compressed(fx.base_dataset(gray12, "MONOCHROME2", bits_stored=12), gray12,
                                               fx.JPEG2000Lossless), tmp / "j2k_gray12.dcm"), gray12, box)
    out["jpeg_ybr422_cine"] = (fx.save(fx.jpeg_baseline(cine, subsampling=1), tmp / "jpeg422.dcm"), None, box)
    out["jpeg_ybr_full"] = (fx.save(fx.jpeg_baseline(rgb[None], subsampling=0), tmp / "jpeg444.dcm"), None, box)
    return out


KINDS = ["mono2_8", "mono2_12", "mono1_12", "rgb", "ybr_full", "palette16", "palette8", "rle_gray_cine",
         "rle_rgb_cine", "j2k_ybr_rct", "j2k_ybr_ict", "j2k_gray12", "jpeg_ybr422_cine", "jpeg_ybr_full"]
SHIPPED = ["JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_jls_lossy_sample.dcm", "JPEGLSNearLossless_16.dcm",
           "SC_rgb_rle_16bit_2frame.dcm", "SC_ybr_full_422_uncompressed.dcm", "GDCMJ2K_TextGBR.dcm",
           "SC_rgb_jpeg_dcmtk.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "image_dfl.dcm"]


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return _fixtures(tmp_path_factory.mktemp("kinds"), np.random.default_rng(20))


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_decodes_lazily_in_the_display_convention(kinds, name):
    path, expected, _ = kinds[name]
    needs_decoder(path)
    source = frame_io.open_source(path)
    frames = list(source)
    reference = display_pixels(path) if expected is None else expected
    assert len(frames) == source.count == len(reference)
    assert (source.height, source.width) == reference.shape[1:3]
    assert source.samples == (3 if reference.ndim == 4 else 1)
    for got, want in zip(frames, reference):
        assert got.dtype == source.dtype and np.array_equal(got, want), name
    assert source.max_value == {"mono2_12": 4095, "mono1_12": 4095, "j2k_gray12": 4095}.get(name, 255)


@pytest.mark.parametrize("name", SHIPPED)
def test_pydicom_test_files_of_the_other_syntaxes(name):
    """JPEG extended/lossless, JPEG-LS, 16-bit RGB, YBR_FULL_422 native, big endian, deflated:
    decoded as pydicom decodes them."""
    path = fx.shipped(name)
    if not path.exists():
        pytest.skip(f"pydicom's test file {name} is not installed")
    needs_decoder(path)
    frames = list(frame_io.open_source(path))
    reference = display_pixels(path)
    assert len(frames) == len(reference)
    assert all(np.array_equal(g, w) for g, w in zip(frames, reference))


# ----------------------------------------------------------------------------- the derived instance

def check_derived(src, out, *, frames: int):
    a, b = pydicom.dcmread(src), pydicom.dcmread(out)
    assert (b.Rows, b.Columns, int(b.get("NumberOfFrames", 1) or 1)) == (a.Rows, a.Columns, frames)
    assert b.SOPInstanceUID != a.SOPInstanceUID and b.SeriesInstanceUID != a.SeriesInstanceUID
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.SOPClassUID == a.SOPClassUID and b.StudyInstanceUID == a.StudyInstanceUID
    for key in ("PatientName", "PatientID", "Manufacturer", "ManufacturerModelName", "StudyDate"):
        assert b.get(key) == a.get(key), key
    assert list(b.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert b.SourceImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert b.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    gray = a.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    assert b.PhotometricInterpretation == ("MONOCHROME2" if gray else "RGB")
    if "SequenceOfUltrasoundRegions" in a:
        assert b.SequenceOfUltrasoundRegions == a.SequenceOfUltrasoundRegions
    return a, b


@pytest.mark.parametrize("name", ["mono1_12", "palette16", "rle_rgb_cine", "j2k_ybr_rct", "jpeg_ybr422_cine"])
def test_cli_writes_a_derived_instance_changing_only_the_tissue(tmp_path, ckpt, kinds, capsys, name):
    src, expected, box = kinds[name]
    needs_decoder(src)
    rc, out, err = cli([ckpt, src, "--out", tmp_path, "--region", ",".join(map(str, box))], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    (written,) = summary["outputs"]
    assert written["format"] == "dicom" and written["tissue"].startswith("--region")
    assert "tissue: --region" in err  # said in the output, per file
    a, b = check_derived(src, written["output"][0], frames=len(display_pixels(src)))
    sha = summary["checkpoint_sha256"]
    assert "br-unet" in b.DerivationDescription and sha in b.DerivationDescription
    before, after = display_pixels(src), b.pixel_array.reshape(display_pixels(src).shape)
    t, l, h, w = box
    outside = np.ones(before.shape[1:3], bool)
    outside[t:t + h, l:l + w] = False
    assert np.array_equal(before[:, outside], after[:, outside])  # bit for bit
    inside_changed = (before[:, t:t + h, l:l + w] != after[:, t:t + h, l:l + w])
    assert inside_changed.any()
    if before.ndim == 4:  # fx.scanner_frame's Doppler patch and white line inside the tissue: kept
        doppler, line = (slice(t + 10, t + 20), slice(l + 10, l + 30)), (t + h - 8, slice(l + 4, l + w - 4))
        assert (before[(slice(None), *doppler)] != before[(slice(None), *line)][:, :1, None]).any()
        assert np.array_equal(before[(slice(None), *doppler)], after[(slice(None), *doppler)])
        assert np.array_equal(before[(slice(None), *line)], after[(slice(None), *line)])


def test_gray_region_is_the_network_on_the_reflected_region(tmp_path, ckpt, kinds, capsys):
    src, gray12, box = kinds["mono2_12"]
    rc, out, err = cli([ckpt, src, "--out", tmp_path, "--region", ",".join(map(str, box))], capsys)
    assert rc == 0, err
    after = pydicom.dcmread(tmp_path / "mono2_12.dcm").pixel_array
    t, l, h, w = box
    model = D.load_denoiser(ckpt, "cpu")
    r = D.receptive_radius(model)
    v = gray12[0, t:t + h, l:l + w].astype(np.float32) / 4095
    tissue = regions.detect_tissue(v)
    assert tissue.all()  # the region is all speckle, so all of it is tissue
    expected = direct(model, np.pad(v, r, mode="reflect"))[r:r + h, r:r + w] * 4095
    assert np.abs(after[t:t + h, l:l + w] - expected).max() <= 1.0
    assert after.dtype == np.uint16 and after.max() <= 4095


def test_ultrasound_regions_are_used_by_default(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(21)
    rgb, box = fx.scanner_frame(rng)
    t, l, h, w = box
    ecg = fx.region_item((80, 0, 16, 128), spatial=4, data_type=9)  # a waveform: not despeckled
    src = fx.save(fx.with_regions(fx.base_dataset(rgb[None], "RGB"), fx.region_item(box), ecg), tmp_path / "r.dcm")
    rc, out, err = cli([ckpt, src, "--out", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert json.loads(out)["outputs"][0]["tissue"].startswith("ultrasound regions: T,L,H,W=24,16")
    after = pydicom.dcmread(tmp_path / "out" / "r.dcm").pixel_array
    outside = np.ones(rgb.shape[:2], bool)
    outside[t:t + h, l:l + w] = False
    assert np.array_equal(rgb[outside], after[outside]) and not np.array_equal(rgb, after)
    # a file region outside the image (a resized export): the tissue is detected instead, and
    # the output says why; a --region outside: one line naming the file, nothing written
    bad = fx.save(fx.with_regions(fx.base_dataset(rgb[None], "RGB"), fx.region_item((60, 100, 50, 40))),
                  tmp_path / "bad.dcm")
    rc, out, err = cli([ckpt, bad, "--out", tmp_path / "o2"], capsys)
    assert rc == 0, err
    assert json.loads(out)["outputs"][0]["tissue"].startswith("auto-detected (the file's ultrasound region 1")
    rc, out, err = cli([ckpt, src, "--out", tmp_path / "o3", "--region", "90,0,10,10"], capsys)
    assert rc == 2 and "r.dcm: --region 90,0,10,10" in err and not (tmp_path / "o3").exists()


def test_automatic_detection_finds_the_speckle_not_the_text(tmp_path, ckpt, capsys):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(22)
    h, w = 120, 160
    v = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    fan = ((yy - 5) ** 2 + (xx - 80) ** 2 < 110 ** 2) & (np.abs(xx - 80) < (yy - 5) * 0.9) & (yy > 15)
    v[fan] = fx.speckle_frame(rng, h, w)[fan]
    im = Image.fromarray(np.rint(v * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.text((2, 2), "PLA Gen THI 12cm", fill=255)
    draw.text((118, 60), "MI 0.9", fill=200)
    draw.rectangle((150, 10, 155, 60), fill=128)  # a gray-scale bar: dense, small, beside the fan
    gray = np.asarray(im)
    tissue = regions.detect_tissue(gray.astype(np.float32) / 255)
    iou = (tissue & fan).sum() / (tissue | fan).sum()
    assert iou > 0.9, iou
    assert not tissue[:12].any() and not tissue[10:61, 140:].any()  # no text, no bar
    src = fx.save(fx.base_dataset(gray[None], "MONOCHROME2"), tmp_path / "fan.dcm")
    rc, out, err = cli([ckpt, src, "--out", tmp_path / "out"], capsys)
    assert rc == 0 and "tissue: auto-detected" in err
    after = pydicom.dcmread(tmp_path / "out" / "fan.dcm").pixel_array
    assert np.array_equal(after[~tissue], gray[~tissue]) and (after[tissue] != gray[tissue]).mean() > 0.5


def test_reflection_fill():
    rng = np.random.default_rng(23)
    v = rng.random((30, 40)).astype(np.float32)
    known = np.zeros_like(v, bool)
    known[8:20, 10:31] = True
    # a rectangle: numpy's reflect padding
    filled = regions.reflect_fill(v, known)
    pad = np.pad(v[8:20, 10:31], ((8, 10), (10, 9)), mode="reflect")
    assert np.array_equal(filled, pad)
    # any shape: known pixels kept, every other value taken from a known pixel
    blob = rng.random((30, 40)) > 0.6
    index = regions.reflection_index(blob)
    assert np.array_equal(index.reshape(30, 40)[blob], np.flatnonzero(blob))
    assert blob.ravel()[index].all()


# ----------------------------------------------------------------------------- validator

def _validator_errors(path) -> set[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line.split(" - ", 1)[-1].strip() for line in (r.stdout + r.stderr).splitlines()
            if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None and shutil.which("dcmdump") is None,
                    reason="no DICOM validator installed (apt-get install dicom3tools, or dcmtk)")
@pytest.mark.parametrize("name", ["rle_rgb_cine", "palette16", "mono2_8", "jpeg_ybr422_cine"])
def test_validator_finds_nothing_new(tmp_path, ckpt, kinds, capsys, name):
    """dciodvfy (dicom3tools): the output has no error the input did not have (the fixtures
    are minimal, so the input's own Type 2 gaps are allowed); else dcmtk's dcmdump parses it.
    (A 12-bit US image is itself outside the US IOD, BitsAllocated 8, so its output is too.)"""
    src, _, box = kinds[name]
    rc, out, err = cli([ckpt, src, "--out", tmp_path, "--region", ",".join(map(str, box))], capsys)
    assert rc == 0, err
    written = json.loads(out)["outputs"][0]["output"][0]
    if shutil.which("dciodvfy"):
        new = _validator_errors(written) - _validator_errors(src)
        assert not new, new
    else:
        r = subprocess.run(["dcmdump", "-q", "+E", written], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- pydicom's examples

EXAMPLES = {"ybr_color": 30, "rgb_color": 1, "palette_color": 1, "jpeg2k": 1}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_pydicom_examples(tmp_path, ckpt, capsys, name):
    """The scanner files pydicom ships (pydicom.examples, MIT-licensed package; from NEMA's
    WG04 sample set, GDCM's test data and a Philips file, per pydicom's test_files/README)."""
    from pydicom import examples

    path = examples.get_path(name)
    needs_decoder(path)
    rc, out, err = cli([ckpt, path, "--out", tmp_path, "--detect-tissue", "--batch-size", "10"], capsys)
    assert rc == 0, err
    written = json.loads(out)["outputs"][0]
    assert written["frames"] == EXAMPLES[name] and written["tissue"].startswith("auto-detected")
    a, b = check_derived(path, written["output"][0], frames=EXAMPLES[name])
    before = display_pixels(path)
    after = b.pixel_array.reshape(before.shape)
    changed = (before != after).any(axis=(0, 3) if before.ndim == 4 else 0)
    source = frame_io.open_source(path)
    first = next(iter(source))
    tissue = regions.detect_tissue(gray_level(first, source.max_value),
                                   regions.chroma(first, source.max_value) > regions.CHROMA_MAX)
    assert changed.any() and not changed[~tissue].any()  # outside the detected tissue: bit for bit
    if shutil.which("dciodvfy"):
        assert not _validator_errors(written["output"][0]) - _validator_errors(path)


def test_example_regions_that_do_not_fit_fall_back_to_detection(tmp_path, ckpt, capsys):
    """pydicom's palette example was cropped without its regions: the tissue is detected
    instead, and the output says why."""
    from pydicom import examples

    rc, out, err = cli([ckpt, examples.get_path("palette_color"), "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    written = json.loads(out)["outputs"][0]
    assert written["tissue"].startswith("auto-detected (the file's ultrasound region 1")
    assert "lies outside the 350x800 image" in written["tissue"]


def test_png_and_tiff_out_of_a_colour_cine(tmp_path, ckpt, kinds, capsys):
    """The same frames through the PNG sink (one RGB PNG a frame) and the TIFF sink (one
    page a frame) as through the DICOM sink; formats that cannot hold the input are refused."""
    from PIL import Image

    src, cine, box = kinds["rle_rgb_cine"]
    region = ["--region", ",".join(map(str, box))]
    for fmt in ("dicom", "png", "tiff"):
        rc, _, err = cli([ckpt, src, "--out", tmp_path / fmt, "--format", fmt, *region], capsys)
        assert rc == 0, err
    dicom = pydicom.dcmread(tmp_path / "dicom" / "rle_rgb.dcm").pixel_array
    for k in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / f"rle_rgb.f{k:04d}.png")), dicom[k])
    with Image.open(tmp_path / "tiff" / "rle_rgb.tif") as im:
        assert im.n_frames == 3
        im.seek(2)
        assert np.array_equal(np.asarray(im.convert("RGB")), dicom[2])
    png = tmp_path / "scan.png"
    Image.fromarray(cine[0]).save(png)
    rc, _, err = cli([ckpt, png, "--out", tmp_path / "o", "--format", "dicom"], capsys)
    assert rc == 2 and "scan.png: --format dicom needs a DICOM input" in err
    deep = fx.shipped("SC_rgb_rle_16bit_2frame.dcm")
    if deep.exists():
        rc, _, err = cli([ckpt, deep, "--out", tmp_path / "o", "--format", "png", "--whole-frame"], capsys)
        assert rc == 2 and "16-bit colour cannot be written as PNG" in err
    assert not (tmp_path / "o").exists()
