"""speckle-denoise: files in and out at their bit depth and size, tiling, metrics, and refusals.

Networks are width 4 with random weights and non-trivial eval norms (a checkpoint dict saved
directly in speckle-train's format); one test trains one for an epoch through the real loop.

Tolerances:
- Through the CLI, outputs are compared with the network run directly on the whole image,
  after rounding to the file's scale: at most one code apart (the two fp32 results may sit on
  either side of a rounding boundary).
- Tiled vs untiled (outputs v in [0, 1]): with the default overlap every kept pixel sees the
  same inputs and padding (denoise.py's docstring), so only the convolutions' summation order
  can differ: fp32 allowed 1e-5 (measured 6e-8, 1 ulp); float64 allowed 1e-12 (measured 0).
  In float64, m pixels less overlap must break it (> 1e-10): the measured context is tight.
"""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models import build_model
from speckle_models.inference import denoise as D
from speckle_models.inference import image_io
from speckle_models.metrics.speckle_stats import enl, speckle_snr
from speckle_models.training.checkpoint import CHECKPOINT_VERSION
from speckle_models.training.config import TrainConfig
from tests.denoise_helpers import (assert_one_code, cli, cli_captured, dicom_file, direct, random_model,
                                   save_checkpoint, write_png)

pytestmark = pytest.mark.usefixtures("one_thread")

TILED_ATOL = 1e-5
TILED_ATOL64 = 1e-12
# receptive radius, context needed next to an m-aligned window edge, default overlap
CONTEXT = {"d-unet": (61, 47, 96), "br-unet": (61, 47, 96), "di-conv-ae": (22, 22, 44)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", "d-unet")


# ----------------------------------------------------------------------------- bit depth, size, colour

@pytest.mark.parametrize("dtype,fmt", [(np.uint8, "png"), (np.uint16, "png"), (np.uint16, "tiff")])
def test_bit_depth_and_odd_size_round_trip(tmp_path, ckpt, dtype, fmt, capsys):
    top = np.iinfo(dtype).max
    a = np.random.default_rng(1).integers(0, top + 1, (37, 53), dtype=dtype)
    src = write_png(tmp_path / "in" / "scan.png", a)
    rc, out, err = cli_captured([ckpt, src, "--out", tmp_path / "out", "--format", fmt, "--whole-frame"], capsys)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    precision = summary["path"]["precision"]
    assert summary["path"]["levels"] == top and (precision == "fp32" or top == 255)  # bf16: 8-bit only
    out_path = tmp_path / "out" / ("scan.png" if fmt == "png" else "scan.tif")
    with Image.open(out_path) as im:
        assert im.mode == ("L" if dtype == np.uint8 else "I;16") and im.size == (53, 37)
        got = np.asarray(im)
    assert got.dtype == dtype and got.shape == (37, 53)
    expected = direct(D.load_denoiser(ckpt, "cpu"), a.astype(np.float32) / top) * top
    assert_one_code(got, expected, precision)
    assert 0 < got.std()  # not a constant image


def test_rgb_and_palette_go_to_bt601_luminance(tmp_path, ckpt):
    rgb = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    frames = image_io.read_image(write_png(tmp_path / "rgb.png", rgb))
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    assert frames.max_value == 255 and np.abs(frames.frames[0] - luma).max() < 1e-6
    # a palette of grays reads as those grays
    gray = np.random.default_rng(3).integers(0, 256, (20, 30), dtype=np.uint8)
    pal = Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    path = tmp_path / "pal.png"
    pal.save(path)
    expected = np.asarray(pal.convert("L"), np.float32) / 255
    assert np.abs(image_io.read_image(path).frames[0] - expected).max() < 1e-6
    # the API: colour in, gray out, same as denoising the float luminance
    model = D.load_denoiser(ckpt, "cpu")
    out_rgb, out_luma = D.denoise_images(model, [rgb, luma.astype(np.float32)])
    assert out_rgb.dtype == np.uint8 and out_rgb.shape == (24, 40)
    assert np.abs(out_rgb - out_luma * 255).max() <= 0.5 + 1e-3


# ----------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("name", ["d-unet", "br-unet", "di-conv-ae"])
def test_receptive_field_is_the_documented_one(name):
    model = build_model(name, width=4)
    got = D.receptive_radius(model), D.aligned_halo(model), D.default_overlap(model)
    assert got == CONTEXT[name]


@pytest.mark.parametrize("length,tile,overlap", [(197, 128, 96), (293, 64, 44), (128, 128, 96), (161, 32, 16)])
def test_tile_spans_partition_the_axis(length, tile, overlap):
    spans = D.tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    keep = [k for s in spans for k in range(s[2], s[3])]
    assert keep == list(range(length))  # each pixel kept once, in order
    for start, stop, k0, k1 in spans:
        assert start % (tile - overlap or 1) == 0 and stop - start <= tile
        assert (k0 == 0 or k0 - start >= overlap // 2) and (k1 == length or stop - k1 >= overlap // 2)


@pytest.mark.parametrize("name,tile", [("d-unet", 128), ("br-unet", 128), ("di-conv-ae", 64)])
def test_tiled_equals_untiled(name, tile):
    model = random_model(name, seed=4)
    v = np.random.default_rng(5).random((197, 293), dtype=np.float32)  # no side a multiple
    whole = D.denoise_frames(model, [v], max_pixels=10**9)[0]
    assert np.array_equal(whole, direct(model, v))  # untiled is the plain forward
    overlap = CONTEXT[name][2]
    assert len(D.tile_spans(197, tile, overlap)) >= 3 and len(D.tile_spans(293, tile, overlap)) >= 4
    tiled = D.denoise_frames(model, [v], max_pixels=tile * tile, tile=tile, batch_size=5)[0]
    err = np.abs(tiled - whole).max()
    assert err <= TILED_ATOL, f"{name}: fp32 tiled differs from untiled by {err:.3g}"

    model64 = model.double()
    whole64 = D.denoise_frames(model64, [v], max_pixels=10**9)[0]
    tiled64 = D.denoise_frames(model64, [v], max_pixels=tile * tile, tile=tile)[0]
    assert tiled64.dtype == np.float64 and np.abs(tiled64 - whole64).max() <= TILED_ATOL64
    m = D.size_multiple(model)
    short = D.denoise_frames(model64, [v], max_pixels=tile * tile, tile=tile, overlap=overlap - m)[0]
    assert np.abs(short - whole64).max() > 100 * TILED_ATOL64, "one multiple less overlap went unnoticed"


def test_tiling_arguments_are_checked(ckpt):
    model = D.load_denoiser(ckpt, "cpu")
    v = np.zeros((64, 64), np.float32)
    for kw, msg in [(dict(tile=40), "multiple of 16"), (dict(tile=32, overlap=8), "multiple of 16"),
                    (dict(tile=32, overlap=32), "in \\[0, tile"), (dict(tile=48, max_pixels=2000), "more than max_pixels")]:
        with pytest.raises(ValueError, match=msg):
            D.denoise_frames(model, [v], **{"max_pixels": 1024, "overlap": 16, **kw})


# ----------------------------------------------------------------------------- files and folders

def test_folders_are_walked_recursively(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(6)
    src = tmp_path / "scans"
    write_png(src / "a.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    write_png(src / "deep" / "er" / "b.PNG", rng.integers(0, 256, (16, 48), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(src / "c.tif")
    (src / "notes.txt").write_text("not an image")
    write_png(src / ".hidden.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    out = src / "denoised"  # inside the input folder: skipped when walking
    rc, _ = cli([ckpt, src, "--out", out], capsys)
    assert rc == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "c.png", "deep/er/b.png"]
    rc, _ = cli([ckpt, src, "--out", out, "--overwrite"], capsys)  # the outputs are not inputs
    assert rc == 0 and sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.png", "b.png", "c.png"]


def test_refuses_to_overwrite_unless_asked(tmp_path, ckpt, capsys):
    src = write_png(tmp_path / "a.png", np.full((20, 20), 100, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"keep me")
    rc, err = cli([ckpt, src, "--out", out], capsys)
    assert rc == 2 and "a.png exists" in err and "--overwrite" in err
    assert (out / "a.png").read_bytes() == b"keep me"
    rc, _ = cli([ckpt, src, "--out", out, "--overwrite"], capsys)
    assert rc == 0 and Image.open(out / "a.png").size == (20, 20)
    # two inputs that would write one file
    write_png(tmp_path / "b" / "a.png", np.zeros((20, 20), np.uint8))
    rc, err = cli([ckpt, src, tmp_path / "b" / "a.png", "--out", tmp_path / "o2"], capsys)
    assert rc == 2 and "would both be written" in err


def test_failed_write_leaves_no_file(tmp_path, ckpt, monkeypatch):
    src = write_png(tmp_path / "a.png", np.full((20, 20), 7, np.uint8))
    out = tmp_path / "out"

    def failing(f, frames, fmt):
        f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(image_io, "_encode", failing)
    with pytest.raises(OSError, match="disk full"):
        D.main([str(ckpt), str(src), "--out", str(out), "--no-progress"])
    assert list(out.iterdir()) == []  # neither a.png nor its temp file


def test_corrupt_and_unsupported_files_are_named(tmp_path, ckpt, capsys):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64), dtype=np.uint8)).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[:200])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    gif = tmp_path / "anim.gif"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(gif)
    floats = tmp_path / "float.tif"
    Image.fromarray(np.zeros((20, 20), np.float32)).save(floats)
    for path, msg in [(truncated, "not a readable"), (garbage, "not a readable"),
                      (gif, "unsupported image format GIF"), (floats, "32-bit float")]:
        with pytest.raises(ValueError, match=msg) as info:
            image_io.read_image(path)
        assert str(path) in str(info.value)
        rc, err = cli([ckpt, path, "--out", tmp_path / "out"], capsys)
        assert rc == 2 and str(path) in err and len(err.strip().splitlines()) == 1
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_checkpoints_are_refused(tmp_path, capsys):
    src = write_png(tmp_path / "a.png", np.zeros((20, 20), np.uint8))
    cases = {
        "resnet.pt": (save_checkpoint(tmp_path / "resnet.pt", "d-unet", model="resnet"), "'resnet' network"),
        "swapped.pt": (save_checkpoint(tmp_path / "swapped.pt", "d-unet", model="di-conv-ae"),
                       "do not fit a di-conv-ae"),
        "wide.pt": (save_checkpoint(tmp_path / "wide.pt", "br-unet", width=8), "do not fit a br-unet"),
    }
    v2 = tmp_path / "v2.pt"
    state = torch.load(cases["wide.pt"][0], weights_only=True)
    torch.save({**state, "version": CHECKPOINT_VERSION + 1}, v2)
    cases["v2.pt"] = (v2, "checkpoint version")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\0" * 100)
    cases["junk.pt"] = (junk, "not a readable checkpoint")
    for name, (path, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            D.load_denoiser(path, "cpu")
        rc, err = cli([path, src, "--out", tmp_path / "out"], capsys)
        assert rc == 2 and name in err and "Traceback" not in err, (name, err)


def test_too_small_images_are_refused(tmp_path, ckpt, capsys):
    small = write_png(tmp_path / "small.png", np.zeros((15, 40), np.uint8))
    rc, err = cli([ckpt, small, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "small.png is 15x40" in err and "16x16" in err
    with pytest.raises(ValueError, match="image 0 is 15x40"):
        D.denoise_images(D.load_denoiser(ckpt, "cpu"), [np.zeros((15, 40), np.uint8)])


@pytest.mark.parametrize("argv,msg", [
    (["--roi-a", "1,2,3"], "top,left,height,width"),
    (["--roi-a", "0,0,4,4", "--roi-b", "4,4,4,4"], "need --metrics"),
    (["--metrics", "--roi-a", "0,0,4,4"], "go together"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--format", "jpeg"], "invalid choice"),
])
def test_cli_user_errors_exit_2(tmp_path, ckpt, capsys, argv, msg):
    src = write_png(tmp_path / "a.png", np.zeros((20, 20), np.uint8))
    rc, err = cli([ckpt, src, "--out", tmp_path / "out", *argv], capsys)
    assert rc == 2 and msg in err and "Traceback" not in err


def test_cli_as_a_process(tmp_path, ckpt):
    """The module entry point: exit status 2 and one line for a missing input, no traceback."""
    r = subprocess.run([sys.executable, "-m", "speckle_models.inference.denoise", str(ckpt), str(tmp_path / "nope.png"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"speckle-denoise: error: {tmp_path / 'nope.png'}: no such file or folder"


# ----------------------------------------------------------------------------- DICOM

def test_dicom_frames_bit_depth_and_formats(tmp_path, ckpt, capsys):
    rng = np.random.default_rng(8)
    cine = rng.integers(0, 4096, (3, 24, 40), dtype=np.uint16)  # 12 bits stored in 16
    path = dicom_file(tmp_path / "in" / "cine", cine, 12)  # no suffix: sniffed by its preamble
    single = dicom_file(tmp_path / "in" / "one.dcm", rng.integers(0, 256, (1, 20, 30), dtype=np.uint8), 8)
    frames = image_io.read_image(path)
    assert frames.kind == "dicom" and frames.max_value == 4095 and len(frames.frames) == 3
    assert np.array_equal(frames.frames[1], (cine[1] / np.float32(4095)).astype(np.float32))

    rc, _ = cli([ckpt, path, single, "--out", tmp_path / "png", "--format", "png", "--whole-frame"], capsys)
    assert rc == 0
    model = D.load_denoiser(ckpt, "cpu")
    for k in range(3):
        got = np.asarray(Image.open(tmp_path / "png" / f"cine.f{k:04d}.png"))
        assert got.dtype == np.uint16 and got.max() <= 4095  # the input's 12-bit scale
        assert np.abs(got - direct(model, frames.frames[k]) * 4095).max() <= 1.0
    assert np.asarray(Image.open(tmp_path / "png" / "one.png")).dtype == np.uint8

    rc, err = cli([ckpt, path, "--out", tmp_path / "tif", "--format", "tiff", "--whole-frame"], capsys)
    assert rc == 0, err
    with Image.open(tmp_path / "tif" / "cine.tif") as im:
        assert im.n_frames == 3
        im.seek(2)
        assert np.array_equal(np.asarray(im), np.asarray(Image.open(tmp_path / "png" / "cine.f0002.png")))

    inverted = dicom_file(tmp_path / "mono1.dcm", cine[:1], 12, photometric="MONOCHROME1")
    assert np.allclose(image_io.read_image(inverted).frames[0], 1 - frames.frames[0])


def test_dicom_undecodable_or_without_pydicom(tmp_path, ckpt, capsys, monkeypatch):
    """Bytes that are not the syntax they claim: one line naming the file (the missing-plugin
    line is tests/test_dicom_refusals.py's); no pydicom: one line naming the extra."""
    pytest.importorskip("pydicom", reason="DICOM needs pydicom (pip install pydicom)")
    from pydicom.uid import JPEGLSLossless

    compressed = dicom_file(tmp_path / "jpegls.dcm", np.zeros((1, 20, 20), np.uint8), 8,
                            transfer_syntax=JPEGLSLossless)
    with pytest.raises(ValueError, match="jpegls.dcm: cannot decode its pixel data \\(JPEG-LS"):
        image_io.read_image(compressed)
    rc, err = cli([ckpt, compressed, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "jpegls.dcm: cannot decode" in err and len(err.strip().splitlines()) == 1

    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(ModuleNotFoundError, match="jpegls.dcm is a DICOM file; reading DICOM needs pydicom"):
        image_io.read_image(compressed)
    rc, err = cli([ckpt, compressed, "--out", tmp_path / "out"], capsys)
    assert rc == 2 and "speckle-kernels[dicom]" in err


# ----------------------------------------------------------------------------- metrics and figures

def test_metrics_and_figures(tmp_path, ckpt, capsys):
    """The CLI's metrics rows: the real-scan judge's windows, ENL/SNR and the ROI contrast inside
    the tissue (tests/test_real_scan.py and test_tissue_metrics.py check the judge itself)."""
    rng = np.random.default_rng(9)
    a = (rng.rayleigh(0.2, (48, 64)) * 255).clip(1, 250).astype(np.uint8)
    a[:, 32:] //= 3  # a darker half for the CNR regions
    src = write_png(tmp_path / "a.png", a)
    out = tmp_path / "out"
    rc, _ = cli([ckpt, src, "--out", out, "--metrics", "--figure", "--metrics-window", "12",
                 "--roi-a", "4,4,20,20", "--roi-b", "4,40,20,20", "--whole-frame"], capsys)
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["model"] == "d-unet" and doc["roi_a"] == [4, 4, 20, 20] and len(doc["checkpoint_sha256"]) == 64
    (row,) = doc["images"]
    assert row["tissue_pixels"] == 48 * 64 and row["windows"] >= 1
    before = torch.from_numpy(a.astype(np.float64) / 255)[None]
    after = torch.from_numpy(np.asarray(Image.open(out / "a.png")).astype(np.float64) / 255)[None]
    # the judge's ENL is the mean over its windows of mu^2 / sigma^2 (SNR: of mu / sigma); the
    # tool computes from float32 v = u8 / 255, these from float64: 1e-6 relative
    boxes = [tuple(b) for b in row["window_boxes"]]
    assert all(h == w == 12 for _, _, h, w in boxes)
    snr_before = np.mean([speckle_snr(before, b).item() for b in boxes])
    enl_after = np.mean([enl(after, b).item() for b in boxes])
    assert row["snr_before"] == pytest.approx(snr_before, rel=1e-6)
    assert row["enl_after"] == pytest.approx(enl_after, rel=1e-6)
    assert row["cnr_before"] > 0 and 0 <= row["gcnr_after"] <= 1 and row["gcnr_bins"] == 15  # Rice: two 400-px regions, ceil(2 * 400^(1/3))
    assert row["edge_ratio"] > 0 and row["mean_abs_delta"] >= 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("file,frame,output,tissue_pixels,windows,enl_before")
    with Image.open(out / "a.figure.png") as fig:
        assert fig.size == (2 * 64 + 4, 48)
    # metrics files are outputs too: refused without --overwrite
    (out / "a.png").unlink()
    (out / "a.figure.png").unlink()
    rc, err = cli([ckpt, src, "--out", out, "--metrics", "--whole-frame"], capsys)
    assert rc == 2 and "metrics.json exists" in err
    # a region that does not fit is a user error naming the file
    rc, err = cli([ckpt, src, "--out", tmp_path / "o2", "--metrics", "--roi-a", "40,0,20,20",
                   "--roi-b", "0,0,4,4", "--whole-frame"], capsys)
    assert rc == 2 and "a.png" in err and "does not fit" in err


# ----------------------------------------------------------------------------- a real checkpoint

def test_checkpoint_from_the_training_loop(tmp_path, capsys):
    from speckle_models.training import loop

    run = tmp_path / "run"
    loop.train(TrainConfig(model="br-unet", out=str(run), image_size=16, count=24, test_count=8,
                           width=4, epochs=1, batch_size=4, device="cpu", progress=False,
                           cache_dir=str(tmp_path / "cache")), plots=False)
    src = write_png(tmp_path / "a.png", np.random.default_rng(10).integers(0, 256, (37, 53), dtype=np.uint8))
    rc, _ = cli([run / "checkpoint.pt", src, "--out", tmp_path / "out", "--fold", "--whole-frame",
                 "--precision", "fp32"], capsys)  # fp32: one code (bf16 is judged in test_realtime.py)
    assert rc == 0
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    v = np.asarray(Image.open(src), np.float32) / 255
    expected = direct(D.load_denoiser(run / "checkpoint.pt", "cpu"), v) * 255
    assert got.shape == (37, 53) and np.abs(got - expected).max() <= 1.0  # folded: one code
