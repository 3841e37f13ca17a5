"""The real-scan judge inside the tissue (metrics/real_scan.py): the window rule, gCNR's adaptive
bins between two tissue regions, and that neither a blur nor a grey veil passes as despeckling.

The frame: log-compressed speckle (tests/dicom_fixtures.speckle_frame, scaled to zero mean and
std 0.08) over a bright and a dark band (a structure with an edge), an anechoic (near-black)
disc, and a tissue mask with a margin outside it. "Despeckled" stand-in: the speckle-free bands
themselves (what a perfect denoiser returns) plus a tenth of the speckle; blur: a Gaussian of
sigma 4 over the input; veil: 0.5 v + 0.3. Bounds are loose and structural (a blur must lose at
least a quarter of the edge gradient, a veil must move the local mean by more than 5 % of full
scale, the perfect denoiser must keep 85 % of the edge and move the mean by less than 2 %), so
they hold for any speckle draw; the veil's edge ratio is exactly its gain, 0.5 (the gradient is
linear in the image). The judge's closed forms are in tests/test_real_scan.py.
"""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from speckle_models.metrics import real_scan as R
from speckle_models.metrics.speckle_stats import gcnr, rice_bins
from tests import dicom_fixtures as fx


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    h, w = 128, 160
    clean = np.full((h, w), 0.55, np.float32)
    clean[:, 80:] = 0.3  # an edge down the middle
    yy, xx = np.mgrid[:h, :w]
    cyst = (yy - 90) ** 2 + (xx - 40) ** 2 < 14 ** 2
    clean[cyst] = 0.02
    speckle = fx.speckle_frame(rng, h, w, mean=0.5).astype(np.float64)  # log-compressed speckle
    speckle = 0.08 * (speckle - speckle.mean()) / speckle.std()  # zero mean, std 0.08
    noisy = np.clip(clean + speckle, 0, 1).astype(np.float32)
    noisy[cyst] = np.clip(0.02 + 0.01 * rng.standard_normal(cyst.sum()), 0, 1)
    tissue = np.zeros((h, w), bool)
    tissue[8:120, 8:152] = True
    return noisy, clean, tissue, cyst


def test_windows_are_inside_the_tissue_and_not_anechoic(scene, monkeypatch):
    noisy, _, tissue, cyst = scene
    row = R.judge(noisy, noisy, tissue=tissue)
    assert row["windows"] == R.WINDOWS
    for t, l, h, w in row["window_boxes"]:
        assert h == w == R.WINDOW and tissue[t:t + h, l:l + w].all()
        assert not cyst[t:t + h, l:l + w].any()  # the cyst has the lowest std, and is refused
    # without the mean floor the cyst would have been picked: the rule matters
    monkeypatch.setattr(R, "DARK_LEVEL", 0.0)
    boxes = R.judge(noisy, noisy, tissue=tissue)["window_boxes"]
    assert any(cyst[t:t + h, l:l + w].any() for t, l, h, w in boxes)
    # the window side is the caller's
    assert all(b[2] == 24 for b in R.judge(noisy, noisy, tissue=tissue, window=24)["window_boxes"])


def test_rice_bins_and_their_bias():
    assert [rice_bins(n) for n in (1, 8, 64, 800, 10**5)] == [2, 4, 8, 19, 93]
    # two 400-pixel regions from one distribution: Rice bins report a smaller gCNR than 256
    # fixed bins, within twice the bias bound sqrt(bins / (pi n))
    rng = np.random.default_rng(41)
    x = torch.from_numpy(rng.rayleigh(1.0, (1, 40, 20)))
    a = torch.zeros(40, 20, dtype=torch.bool)
    a[:, :10] = True
    n = 400
    fixed, rice = gcnr(x, a, ~a, bins=256).item(), gcnr(x, a, ~a, bins="rice").item()
    # the same bins as fixed ones (a value on a bin edge may round to either side: one pixel)
    assert rice == pytest.approx(gcnr(x, a, ~a, bins=rice_bins(n)).item(), abs=1 / n) and rice < fixed
    assert rice < 2 * math.sqrt(rice_bins(n) / (math.pi * n)) and fixed > 0.25


def test_blur_and_veil_do_not_pass(scene):
    noisy, clean, tissue, _ = scene
    ideal = R.judge(noisy, clean + 0.1 * (noisy - clean), tissue=tissue)
    blur = R.judge(noisy, ndimage.gaussian_filter(noisy, 4), tissue=tissue)
    veil = R.judge(noisy, 0.5 * noisy + 0.3, tissue=tissue)
    same = R.judge(noisy, noisy, tissue=tissue)
    assert same["edge_ratio"] == pytest.approx(1.0) and same["mean_abs_delta"] == 0.0
    # ENL goes up for all three: alone it cannot tell them apart
    for row in (ideal, blur):
        assert row["enl_ratio"] > 4
    assert veil["enl_ratio"] > 2
    # the perfect despeckler keeps the edge and the local mean; the blur loses the edge, the
    # veil the contrast and the mean (in /255)
    assert ideal["edge_ratio"] > 0.85 and ideal["mean_abs_delta"] < 0.02 * 255
    assert blur["edge_ratio"] < 0.75
    # exactly 0.5 but for fp32 rounding: the veil's pixels are rounded (half an ulp of ~0.8, 3e-8)
    # and the gradient filter (taps summing to O(1) in absolute value) carries that to each
    # measured gradient, >= EDGE_MIN_GRADIENT = 1/255 at the selected edges: relative 1e-5 at most
    assert veil["edge_ratio"] == pytest.approx(0.5, rel=1e-5) and veil["mean_abs_delta"] > 0.05 * 255
    met = {name: R.meets_targets(row) for name, row in (("ideal", ideal), ("blur", blur), ("veil", veil))}
    assert met["ideal"]["edge_ratio"] and met["ideal"]["mean_abs_delta"]
    assert not met["blur"]["edge_ratio"] and not met["veil"]["mean_abs_delta"]


def test_rois_are_measured_inside_the_tissue(scene):
    noisy, clean, tissue, _ = scene
    row = R.roi_contrast(noisy, clean, tissue, (10, 10, 40, 40), (10, 100, 40, 40))
    assert row["gcnr_bins"] == rice_bins(1600) and row["gcnr_after"] > row["gcnr_before"]
    assert row["cnr_before"] > 0 and row["cnr_after"] is None  # constant regions: CNR is infinite, reported None
    with pytest.raises(ValueError, match="--roi-a .* holds 0 tissue pixel"):
        R.roi_contrast(noisy, clean, tissue, (0, 0, 6, 6), (10, 100, 40, 40))
    with pytest.raises(ValueError, match="--roi-b: box .* does not fit"):
        R.roi_contrast(noisy, clean, tissue, (10, 10, 4, 4), (120, 150, 40, 40))
