"""The tissue metrics: the window rule, gCNR's adaptive bins, and that neither a blur nor a grey
veil passes as despeckling.

The frame: log-compressed speckle (tests/dicom_fixtures.speckle_frame, scaled to zero mean and
std 0.08) over a bright and a dark
band (a structure with an edge), an anechoic (near-black) disc, and a tissue mask with a margin
outside it. "Despeckled" stand-in: the speckle-free bands themselves (what a perfect denoiser
returns) plus a tenth of the speckle; blur: a Gaussian of sigma 4 over the input; veil: 0.5 v + 0.3. Bounds are loose,
structural (a blur must lose at least a quarter of the edge contrast, a veil must move the local
mean by more than 5 % of full scale), so they hold for any speckle draw.
"""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from speckle_models.metrics import tissue_metrics as TM
from speckle_models.metrics.speckle_stats import gcnr
from tests import dicom_fixtures as fx


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(40)
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


def test_window_is_inside_the_tissue_and_not_anechoic(scene):
    noisy, _, tissue, cyst = scene
    t, l, s, _ = TM.tissue_window(noisy, tissue, 16)
    assert tissue[t:t + s, l:l + s].all()
    assert not cyst[t:t + s, l:l + s].any()  # the cyst has the lowest std, and is refused
    # without the mean floor the cyst would have been picked: the rule matters
    floor = TM.MIN_MEAN_FRACTION
    try:
        TM.MIN_MEAN_FRACTION = 0.0
        t0, l0, _, _ = TM.tissue_window(noisy, tissue, 16)
    finally:
        TM.MIN_MEAN_FRACTION = floor
    assert cyst[t0:t0 + 16, l0:l0 + 16].any()


def test_rice_bins_and_their_bias():
    assert [TM.rice_bins(n) for n in (1, 64, 800, 10**5, 10**9)] == [8, 8, 19, 93, 256]
    # two regions from one distribution: Rice bins report a smaller gCNR than 256 fixed bins
    rng = np.random.default_rng(41)
    x = torch.from_numpy(rng.rayleigh(1.0, (1, 40, 20)))
    a = torch.zeros(40, 20, dtype=torch.bool)
    a[:, :10] = True
    n = 400
    fixed, rice = gcnr(x, a, ~a, bins=256).item(), gcnr(x, a, ~a, bins=TM.rice_bins(n)).item()
    assert rice < fixed
    assert rice < 2 * math.sqrt(TM.rice_bins(n) / (math.pi * n / 2)) and fixed > 0.25


def test_blur_and_veil_do_not_pass(scene):
    noisy, clean, tissue, _ = scene
    ideal = TM.tissue_metrics(noisy, clean + 0.1 * (noisy - clean), tissue, window=16)
    blur = TM.tissue_metrics(noisy, ndimage.gaussian_filter(noisy, 4).astype(np.float32), tissue, window=16)
    veil = TM.tissue_metrics(noisy, (0.5 * noisy + 0.3).astype(np.float32), tissue, window=16)
    same = TM.tissue_metrics(noisy, noisy, tissue, window=16)
    assert same["edge_preservation"] == pytest.approx(1.0) and same["local_mean_change"] == 0.0
    # ENL goes up for all three: alone it cannot tell them apart
    for row in (ideal, blur):
        assert row["enl_after"] > 4 * row["enl_before"]
    assert veil["enl_after"] > 2 * veil["enl_before"]
    # the perfect despeckler keeps the edge and the local mean; the blur loses the edge, the
    # veil the contrast and the mean
    assert ideal["edge_preservation"] > 0.85 and ideal["local_mean_change"] < 0.02
    assert blur["edge_preservation"] < 0.75
    assert veil["edge_preservation"] == pytest.approx(0.5, rel=1e-6) and veil["local_mean_change"] > 0.05


def test_rois_are_measured_inside_the_tissue(scene):
    noisy, clean, tissue, _ = scene
    row = TM.tissue_metrics(noisy, clean, tissue, window=16, roi_a=(10, 10, 40, 40), roi_b=(10, 100, 40, 40))
    assert row["gcnr_bins"] == TM.rice_bins(3200) and row["gcnr_after"] > row["gcnr_before"]
    with pytest.raises(ValueError, match="--roi-a .* holds 0 tissue pixel"):
        TM.tissue_metrics(noisy, clean, tissue, roi_a=(0, 0, 6, 6), roi_b=(10, 100, 40, 40))
    with pytest.raises(ValueError, match="--roi-b: box .* does not fit"):
        TM.tissue_metrics(noisy, clean, tissue, roi_a=(10, 10, 4, 4), roi_b=(120, 150, 40, 40))
