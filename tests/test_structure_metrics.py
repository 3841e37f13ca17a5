"""Structure metrics of the despeckling table: gCNR with adaptive bins, Pratt's FOM, beta, and
the per-image scoring on the phantom's regions."""
import math

import numpy as np
import pytest
import torch

from speckle_models.metrics.edges import beta, canny_edges, pratt_fom
from speckle_models.metrics.speckle_stats import gcnr

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rice_bins_cut_the_small_region_bias():
    """Two 60-pixel regions drawn from one distribution: with 256 fixed bins nearly every value
    has its own bin and gCNR looks high (~0.9: the bound sqrt(256 / (pi 60)) is above 1); the
    Rice rule (k = ceil(2 * 60^(1/3)) = 8 bins) keeps it near its bound sqrt(8 / (pi 60)) = 0.21.
    Disjoint regions stay at 1 with either rule."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(200, 1, 12, 10, generator=g, dtype=torch.float64)
    a = torch.zeros(12, 10, dtype=torch.bool)
    a[:6] = True
    fixed, rice = gcnr(img, a, ~a).mean().item(), gcnr(img, a, ~a, bins="rice").mean().item()
    assert fixed > 0.8 and rice < math.sqrt(8 / (math.pi * 60)) + 0.02
    sep = img.clone()
    sep[:, :, :6] += 2.0
    assert torch.all(gcnr(sep, a, ~a, bins="rice") == 1.0)
    # the rule: ceil(2 n^(1/3)) bins of the smaller region; two values one bin apart overlap
    # in no bin only when the bin width separates them
    two = torch.tensor([[[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    m = torch.tensor([[True, True, False, False, False, False, False, False]])
    assert gcnr(two, m, ~m, bins="rice").item() == 1.0
    with pytest.raises(ValueError, match="rice"):
        gcnr(img, a, ~a, bins="sturges")


def _step(n=4, size=40, low=0.3, high=0.7):
    img = torch.full((n, size, size), low, dtype=torch.float64)
    img[:, :, size // 2:] = high
    band = torch.zeros(n, size, size, dtype=torch.bool)
    band[:, :, size // 2 - 5:size // 2 + 5] = True
    return img, band


def test_pratt_fom_known_cases():
    img, band = _step()
    ideal = canny_edges(img, band)
    assert ideal.any(axis=(1, 2)).all()
    assert np.allclose(pratt_fom(img, ideal, band), 1.0)
    # the edge moved by one pixel: detected pixels at distance 1 score 1 / (1 + 1/9) = 0.9
    # (Canny marks the step on one or two columns, so some stay at distance 0)
    moved = torch.roll(img, 1, dims=2)
    assert ((pratt_fom(moved, ideal, band) > 0.85) & (pratt_fom(moved, ideal, band) < 0.97)).all()
    # a grey veil (contrast / 20) drops below the detector's absolute thresholds: FOM 0
    veil = 0.5 + (img - 0.5) / 20
    assert np.allclose(pratt_fom(veil, ideal, band), 0.0)
    # speckle adds false edges in the band: FOM falls
    g = torch.Generator().manual_seed(1)
    speckled = img * torch.distributions.Exponential(torch.tensor(1.0)).sample(img.shape).double().clamp(0, 3) / 1.5
    assert (pratt_fom(speckled.clamp(0, 1), ideal, band) < 0.85).all()
    # no ideal edge in the band: undefined
    assert np.isnan(pratt_fom(img, np.zeros_like(ideal), band)).all()
    del g


def test_beta_known_cases():
    img, band = _step()
    g = torch.Generator().manual_seed(2)
    ref = img + 0.05 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    assert np.allclose(beta(ref, ref, band), 1.0)
    assert np.allclose(beta(0.5 * ref + 0.2, ref, band), 1.0)            # blind to contrast
    noisy = ref + 0.1 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(ref[:, None], (2, 2, 2, 2), mode="replicate"),
                                             5, stride=1)[:, 0]
    assert (beta(noisy, ref, band) < 0.6).all() and (beta(blurred, ref, band) < 0.6).all()
    assert np.isnan(beta(ref, ref, torch.zeros_like(band))).all()
    with pytest.raises(ValueError, match="shape"):
        beta(ref[:, :10], ref, band)


def test_scoring_on_phantom_regions():
    """The target scored against itself is perfect where the metrics have a perfect value;
    the speckled image is worse on every compared metric and rougher in the windows."""
    from speckle_models.data import phantom as P
    from speckle_models.reproduction.scoring import make_regions, score_images

    images, clean, geo = P.generate_phantom(8, image_size=96, seed=2, progress=False,
                                            return_geometry=True)
    x, t = images.double() / 255, clean.double() / 255
    regions = make_regions(t, geo)
    assert regions.windows is not None and regions.valid.any()
    own = score_images(t, t, regions)
    speckled = score_images(x, t, regions)
    assert np.isinf(own["psnr"]).all() and np.allclose(own["fom"], 1.0) and np.allclose(own["beta"], 1.0)
    lesions = regions.valid.any(1).numpy()
    assert np.isfinite(own["gcnr"][lesions]).all() and np.isnan(own["gcnr"][~lesions]).all()
    assert np.nanmean(own["gcnr"]) > np.nanmean(speckled["gcnr"]) + 0.1
    assert np.nanmean(speckled["fom"]) < 0.8 and np.nanmean(speckled["beta"]) < 0.5
    # the speckled image's envelope has about the Rayleigh SNR (1.91; the 2:1 area average of
    # log values along depth raises it), the map's is far higher
    assert 1.5 < np.mean(speckled["snr"]) < 3.0 and np.mean(own["snr"]) > 5
    assert set(speckled) == {"psnr", "ssim", "gcnr", "fom", "beta", "snr", "enl"}
    assert set(score_images(x, t)) == {"psnr", "ssim"}
