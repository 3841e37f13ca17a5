"""speckle-train --target self-supervised: on a folder of the user's scans (PNG, TIFF, DICOM
cine, written here), on the phantom without ever reading its speckle-free maps, resumed bit
for bit, fine-tuned from another run (--init), and the U-Nets' --upsample."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from speckle_models import build_model
from speckle_models.training import checkpoint as C
from speckle_models.training import loop as L
from speckle_models.training import scan_folder
from speckle_models.training import train as T
from tests.denoise_helpers import dicom_file
from speckle_models.inference.image_io import gray_level
from tests.test_train import _equal_state, _strip_times, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_SS = ["--target", "self-supervised", "--image-size", "32", "--count", "16", "--epochs", "1",
           "--batch-size", "4", "--device", "cpu", "--no-progress", "--noise-factor", "0", "--sigma-add", "0"]


def speckle_frames(n, h, w, rng):
    """Rayleigh speckle blurred over ~2 px laterally, a dark band on top: scan-like frames."""
    from scipy.ndimage import gaussian_filter1d

    env = np.hypot(rng.standard_normal((n, h, w)), rng.standard_normal((n, h, w)))
    env = gaussian_filter1d(env, 1.0, axis=2)
    v = np.clip(env / env.max() * 1.6, 0, 1)
    v[:, :4] = 0
    return v


def scan_folder_files(root, rng):
    v = speckle_frames(5, 48, 64, rng)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.rint(v[0] * 255).astype(np.uint8)).save(root / "a.png")
    Image.fromarray(np.rint(v[1] * 65535).astype(np.uint16)).save(root / "sub" / "b.tif")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "a_mask.png")   # skipped
    dicom_file(root / "sub" / "cine.dcm", np.rint(v[2:] * 255).astype(np.uint8), 8)
    return root


def test_scan_folder_reads_every_frame(tmp_path):
    root = scan_folder_files(tmp_path / "scans", np.random.default_rng(1))
    files = scan_folder.scan_files(root)
    assert [p.name for p in files] == ["a.png", "b.tif", "cine.dcm"]
    data = scan_folder.load_scan_folder(root, image_size=32, count=20, seed=3)
    assert data.info["regions"] == 5 and data.train_clean is None
    assert data.train.dtype == torch.uint8 and tuple(data.train.shape[1:]) == (1, 32, 32)
    assert len(data.train) + len(data.val) == 20 and data.test is data.val or torch.equal(data.test, data.val)
    again = scan_folder.load_scan_folder(root, image_size=32, count=20, seed=3)
    assert torch.equal(data.train, again.train)                 # seeded crops
    with pytest.raises(ValueError, match="lower --image-size"):
        scan_folder.load_scan_folder(root, image_size=128, count=4)
    with pytest.raises(FileNotFoundError, match="no .png"):
        (tmp_path / "empty").mkdir()
        scan_folder.load_scan_folder(tmp_path / "empty", image_size=32)


def test_crops_balance_files_and_skip_black(tmp_path):
    # a 30-frame cine of level 40 and one frame of level 200 whose left 3/4 is black: files
    # are drawn uniformly, so about half the crops come from the single frame (binomial, 400
    # draws: 5 standard errors = 0.125). A random 32-px crop of that frame has >= 25% signal
    # with probability 57/225, so all REDRAWS = 20 draws fail with probability 0.75^20 = 0.3%:
    # at most 5% of its crops may stay mostly black (~0.6 expected of ~200)
    root = tmp_path / "scans"
    cine = np.full((30, 48, 64), 40, np.uint8)
    dicom_file(root / "cine.dcm", cine, 8)
    frame = np.zeros((48, 256), np.uint8)
    frame[:, 192:] = 200
    Image.fromarray(frame).save(root / "frame.png")
    data = scan_folder.load_scan_folder(root, image_size=32, count=400, seed=1, val_fraction=0.25)
    crops = torch.cat([data.train, data.val]).float()
    from_frame = crops.amax(dim=(1, 2, 3)) > 100
    assert abs(from_frame.float().mean().item() - 0.5) < 0.125
    signal = (crops[from_frame] > 2).float().mean(dim=(1, 2, 3))
    assert (signal < scan_folder.MIN_SIGNAL).float().mean() <= 0.05
    # (without the redraws ~70% of the frame's crops would be all black and not counted as
    # from_frame, so the balance check above fails: ~0.15 instead of 0.5)


def test_cli_trains_on_a_folder_of_scans(tmp_path, capsys):
    root = scan_folder_files(tmp_path / "scans", np.random.default_rng(2))
    out = tmp_path / "run"
    assert T.main(["--model", "br-unet", "--data", str(root), "--out", str(out), "--width", "4", *TINY_SS]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    corr = doc["speckle_correlation"]
    assert corr["lateral"] >= 2 and corr["axial"] >= 1           # the blur is lateral
    assert doc["config"]["ss_method"] == "blind-spot" and doc["history"][0]["val_psnr"] is None
    ckpt = C.load_checkpoint(out / C.CHECKPOINT_NAME)
    assert ckpt["speckle_correlation"] == corr
    # fine-tuning: --init takes the width and upsampling of its checkpoint
    tuned = tmp_path / "tuned"
    argv = ["--model", "br-unet", "--data", str(root), "--out", str(tuned), "--init", str(out / "checkpoint.pt"),
            *TINY_SS]
    assert T.main(argv) == 0
    assert json.loads((tuned / "metrics.json").read_text())["config"]["width"] == 4
    with pytest.raises(SystemExit):
        T.main(["--model", "d-unet", *argv[2:], "--overwrite"])
    assert "holds a 'br-unet' network, not --model d-unet" in capsys.readouterr().err


class Tripwire:
    """Stands for a speckle-free map: touching it in any way fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a self-supervised run read the speckle-free maps (.{name})")

    def __getitem__(self, item):
        raise AssertionError("a self-supervised run read the speckle-free maps ([])")

    def __len__(self):
        raise AssertionError("a self-supervised run read the speckle-free maps (len)")


def test_phantom_run_never_reads_the_maps_and_resumes_bit_exact(tmp_path, tiny_data):
    import dataclasses

    wired = dataclasses.replace(tiny_data, train_clean=Tripwire(), val_clean=Tripwire(), test_clean=Tripwire())
    kw = dict(target="self-supervised", noise_factor=0.0, sigma_add=0.0, correlation=(1, 2))
    straight = L.train(tiny_config(tmp_path / "a", **kw), data=wired, plots=False)

    def kill(epoch, step):
        if epoch == 1 and step == 2:
            raise L.StopTraining

    with pytest.raises(L.StopTraining):
        L.train(tiny_config(tmp_path / "b", **kw), data=wired, on_step=kill, plots=False)
    resumed = L.train(tiny_config(tmp_path / "b", **kw), data=wired, resume=True, plots=False)
    _equal_state(straight.model.state_dict(), resumed.model.state_dict())
    assert _strip_times(straight.history) == _strip_times(resumed.history)
    with pytest.raises(ValueError, match="other settings"):
        L.train(tiny_config(tmp_path / "b", **{**kw, "ss_method": "neighbor2neighbor"}), data=wired, resume=True)


def test_init_checkpoint_must_fit(tmp_path, tiny_data):
    L.train(tiny_config(tmp_path / "w4", epochs=1), data=tiny_data, plots=False)
    path = tmp_path / "w4" / "checkpoint.pt"
    model = build_model("br-unet", width=4)
    C.load_init_weights(model, path)
    _equal_state(model.state_dict(), C.load_checkpoint(path)["model"])
    with pytest.raises(ValueError, match="do not fit this network"):
        L.train(tiny_config(tmp_path / "w8", epochs=1, width=8, init=str(path)), data=tiny_data, plots=False)
    with pytest.raises(ValueError, match="do not fit this network"):
        L.train(tiny_config(tmp_path / "rs", epochs=1, upsample="resize", init=str(path)), data=tiny_data,
                plots=False)
    run = L.train(tiny_config(tmp_path / "ft", epochs=1, init=str(path), target="self-supervised",
                              correlation=(1, 1)), data=tiny_data, plots=False)
    assert run.history[0]["val_psnr"] is None and run.config.init == str(path)


def test_resize_upsampling_has_no_checkerboard():
    from speckle_models.metrics.real_scan import checkerboard_fraction

    x = torch.full((1, 1, 64, 64), -0.6)                      # a flat dark input
    shares = {}
    for kind in ("transpose", "resize"):
        torch.manual_seed(0)
        model = build_model("br-unet", width=4, upsample=kind).eval()
        with torch.no_grad():
            y = model(x)[0, 0, 16:48, 16:48].double()        # away from the padding
        shares[kind] = checkerboard_fraction(y[None], torch.ones(1, 2, 2, dtype=torch.bool))
    # transposed: its four taps print a 2x2 tile on a flat input (share ~1); resize: only the
    # slow response to the zero padding of the deep levels, bilinearly enlarged (share ~0.01)
    assert shares["transpose"] > 0.5 and shares["resize"] < 0.05, shares
    assert "up.0.1.weight" in build_model("d-unet", width=4, upsample="resize").state_dict()
    with pytest.raises(ValueError, match="U-Nets only"):
        build_model("di-conv-ae", width=4, upsample="resize")


def test_speckle_denoise_runs_a_resize_network_tiled(tmp_path, capsys):
    from speckle_models.inference import denoise as D
    from speckle_models.inference.tiling import denoise_frames
    from tests.denoise_helpers import cli, save_checkpoint, write_png

    torch.manual_seed(0)
    net = build_model("br-unet", width=4, upsample="resize").eval()
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", "br-unet", network=net, upsample="resize")
    frame = np.random.default_rng(0).integers(0, 256, (300, 200), dtype=np.uint8)
    write_png(tmp_path / "in.png", frame)
    rc, err = cli([ckpt, tmp_path / "in.png", "--out", tmp_path / "out", "--whole-frame",
                   "--precision", "fp32"], capsys)  # fp32: one code (bf16 is judged in test_realtime.py)
    assert rc == 0, err
    got = np.asarray(Image.open(tmp_path / "out" / "in.png"), dtype=np.int32)
    v = frame.astype(np.float32) / 255
    want = np.rint(denoise_frames(D.load_denoiser(ckpt, "cpu"), [v])[0] * 255)
    assert np.abs(got - want).max() <= 1
    # tiles: the measured context of the resize network (larger: a 3x3 convolution per level)
    tiled = denoise_frames(net, [v], max_pixels=256 * 256, tile=256)[0]
    assert np.abs(tiled - denoise_frames(net, [v])[0]).max() <= 1e-5


def test_scans_are_cut_to_their_tissue_as_speckle_denoise_cuts_them(tmp_path):
    """A scanner frame (black background, burned-in text, a colour Doppler patch and a white
    caliper line inside the 2D tissue region of its Ultrasound Regions): every crop lies inside
    the region (found there pixel for pixel) and holds no Doppler or caliper pixel; the whole
    frame, asked for, also gives crops with the text or the black border."""
    pytest.importorskip("pydicom")
    from tests import dicom_fixtures as fx

    rng = np.random.default_rng(7)
    rgb, box = fx.scanner_frame(rng, 160, 192, colour=True)
    ds = fx.with_regions(fx.base_dataset(rgb[None], "RGB"), fx.region_item(box))
    root = tmp_path / "scans"
    root.mkdir()
    fx.save(ds, root / "scan.dcm")
    t, l, h, w = box
    gray = np.rint(np.asarray(gray_level(rgb, 255)) * 255).astype(np.uint8)
    overlay = np.zeros(gray.shape, bool)
    overlay[t + 10:t + 20, l + 10:l + 30] = True            # the Doppler patch
    overlay[t + h - 8, l + 4:l + w - 4] = True               # the caliper line
    size = 24
    windows = {}
    for r in range(t, t + h - size + 1):
        for c in range(l, l + w - size + 1):
            windows[gray[r:r + size, c:c + size].tobytes()] = overlay[r:r + size, c:c + size].any()
    data = scan_folder.load_scan_folder(root, image_size=size, count=60, seed=5)
    crops = torch.cat([data.train, data.val])[:, 0].numpy()
    assert all(c.tobytes() in windows for c in crops)       # inside the region
    assert not any(windows[c.tobytes()] for c in crops)     # no overlay pixel
    whole = scan_folder.load_scan_folder(root, image_size=size, count=60, seed=5, whole_frame=True)
    assert any(c.tobytes() not in windows for c in torch.cat([whole.train, whole.val])[:, 0].numpy())
