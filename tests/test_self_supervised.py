"""Self-supervised objectives (training/self_supervised.py): the measured correlation against
the closed form of filtered white noise, and the masks' promise that a scored pixel's
prediction never depends on a pixel its speckle is correlated with.

Correlation: white noise filtered by separable sampled Gaussians (taps g) has the exact
normalized autocorrelation rho(l) = sum_u g(u) g(u + l) / sum_u g(u)^2 along each axis; the
expected decorrelation length is its first lag <= THRESHOLD. The residual removes a Gaussian-6
local mean, which lowers rho by about sigma_z sigma_x / 36 < 0.04; the sampling error is ~0.01
(8 images of 128 x 128). So the filter widths are picked with rho >= THRESHOLD + 0.05 at the
lag before the length and <= THRESHOLD - 0.03 at it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from speckle_models.metrics.psnr_ssim import gaussian_window
from speckle_models.training import self_supervised as S

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_rho(sigma: float, lags: int = 12) -> torch.Tensor:
    g = gaussian_window(2 * math.ceil(4 * sigma) + 1, sigma)
    full = torch.cat([g, torch.zeros(lags)])
    return torch.stack([(full[:g.numel()] * full[l:l + g.numel()]).sum() for l in range(lags)]) / g.square().sum()


def filtered_field(n, h, w, sz, sx):
    noise = torch.randn(n, 1, h + 40, w + 40, dtype=torch.float64)
    gz, gx = (gaussian_window(2 * math.ceil(4 * s) + 1, s) for s in (sz, sx))
    y = F.conv2d(F.conv2d(noise, gx.view(1, 1, 1, -1)), gz.view(1, 1, -1, 1))
    y = y[..., :h, :w]
    return (0.5 + 0.08 * y / y.std()).clamp(0.02, 0.98)


@pytest.mark.parametrize("sz,sx", [(0.8, 1.2), (1.1, 0.6)])
def test_correlation_of_filtered_white_noise(sz, sx):
    expected = []
    for s in (sz, sx):
        rho = exact_rho(s)
        length = int((rho[1:] <= S.THRESHOLD).nonzero()[0]) + 1
        assert rho[length] <= S.THRESHOLD - 0.03 and rho[length - 1] >= S.THRESHOLD + 0.05
        expected.append(length)
    corr = S.measure_correlation(filtered_field(8, 128, 128, sz, sx))
    assert (corr.axial, corr.lateral) == tuple(expected)
    # the FWHM, interpolated between integer lags as measured, of the exact autocorrelation;
    # the detrending's lower rho narrows it by a few per cent
    for got, s in ((corr.axial_fwhm, sz), (corr.lateral_fwhm, sx)):
        assert got == pytest.approx(S._length(exact_rho(s), S.THRESHOLD, "")[1], rel=0.08)
    fp = corr.footprint
    assert len(fp) == 2 * corr.axial - 1 and len(fp[0]) == 2 * corr.lateral - 1
    assert fp[corr.axial - 1][corr.lateral - 1] and fp == tuple(tuple(r[::-1]) for r in fp[::-1])


def test_uncorrelated_and_too_correlated():
    white = (0.5 + 0.05 * torch.randn(4, 1, 64, 64, dtype=torch.float64)).clamp(0.02, 0.98)
    corr = S.measure_correlation(white)
    assert (corr.axial, corr.lateral) == (1, 1) and corr.footprint == ((True,),)
    # horizontal bands: every row one value, so rows stay correlated at every lateral lag
    bands = (0.5 + 0.1 * torch.randn(4, 1, 64, 1, dtype=torch.float64)).expand(4, 1, 64, 64).clamp(0.02, 0.98)
    with pytest.raises(ValueError, match="stays correlated beyond 16 px laterally"):
        S.measure_correlation(bands)
    with pytest.raises(ValueError, match="too small"):
        S.measure_correlation(white[..., :8, :8])
    assert S.measure_correlation(white[..., :12, :12]).axial >= 1      # lags up to 5 fit
    with pytest.raises(ValueError, match="too few"):
        S.measure_correlation(torch.zeros(2, 1, 64, 64))


def _corr(az, ax):
    fp = [[abs(i) / az + abs(j) / ax < 1.0 for j in range(-ax + 1, ax)] for i in range(-az + 1, az)]
    return S.SpeckleCorrelation(az, ax, 1.0, 1.0, tuple(tuple(r) for r in fp))


def test_blind_spot_scored_pixels_never_see_their_footprint():
    corr = _corr(2, 3)
    bs = S.BlindSpot(corr, hidden_fraction=0.2)
    y = torch.rand(2, 1, 24, 28, dtype=torch.float64)
    seed = int(torch.randint(1 << 30, ()))
    seen = {}

    def forward(x):  # keeps the network's input
        seen["x"] = x
        return x

    loss = bs(forward, y, torch.Generator().manual_seed(seed))
    first_input = seen["x"]
    hidden, scored = bs.masks(y.shape, y.device, torch.Generator().manual_seed(seed))
    assert scored.any() and not (scored & ~hidden).any()       # scored pixels are hidden
    # the loss is the mean over scored pixels of (input - y)^2 for the identity network (the
    # objective works in float32: a few float32 roundings of values ~0.1 apart)
    assert float(loss) == pytest.approx(float(((seen["x"] - y)[scored]).square().mean()), rel=1e-5)
    # every pixel a scored pixel's speckle is correlated with is hidden (brute force)
    offsets = [(i - 1, j - 2) for i in range(3) for j in range(5) if corr.footprint[i][j]]
    for n, _, pz, px in scored.nonzero().tolist():
        for dz, dx in offsets:
            if 0 <= pz + dz < 24 and 0 <= px + dx < 28:
                assert hidden[n, 0, pz + dz, px + dx]
    # and no hidden pixel's value reaches the network's input: redraw them all, same input
    redrawn = torch.where(hidden, torch.rand_like(y), y)
    bs(forward, redrawn, torch.Generator().manual_seed(seed))
    assert torch.equal(seen["x"], first_input)
    # hidden share: a pixel is hidden when a seed falls in its F (+) F neighbourhood, so
    # 1 - (1 - rate)^|F (+) F| away from the borders; 2500 seeds here: 2% relative noise, and
    # the borders (2-3 px of 256) lower it by ~2%
    big, _ = bs.masks((4, 1, 256, 256), "cpu", torch.Generator().manual_seed(seed))
    expected = 1 - (1 - bs.rate) ** float(bs.double.sum())
    assert 0.85 * expected < big.double().mean().item() < 1.1 * expected


def test_blind_spot_fill_would_leak_without_the_mask():
    # the deliberately broken fill (a plain blur of every pixel) fails the redraw check above
    bs = S.BlindSpot(_corr(2, 3), hidden_fraction=0.2)
    y = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    hidden, _ = bs.masks(y.shape, y.device, torch.Generator().manual_seed(1))
    assert hidden.any()
    redrawn = torch.where(hidden, torch.rand_like(y), y)

    def broken(t):
        return torch.where(hidden, S.gaussian_blur(t, bs.sigma), t)

    assert not torch.equal(broken(y), broken(redrawn))


def test_neighbor2neighbor_pairs_are_decorrelated():
    corr = _corr(2, 3)
    n2n = S.StridedNeighbor2Neighbor(corr)
    assert n2n.stride == (3, 4)
    sz, sx = n2n.stride
    for a, b in n2n.pairs.tolist():
        dz, dx = b // sx - a // sx, b % sx - a % sx
        inside = abs(dz) < corr.axial and abs(dx) < corr.lateral
        assert not (inside and corr.footprint[dz + corr.axial - 1][dx + corr.lateral - 1]), (dz, dx)
    y = torch.arange(2 * 12 * 16, dtype=torch.float64).view(2, 1, 12, 16)
    choice = torch.randint(len(n2n.pairs), (2, 1, 4, 4))
    g1, g2 = n2n.sample(y, choice)
    assert g1.shape == g2.shape == (2, 1, 4, 4)
    for (i, j) in [(0, 0), (3, 2)]:
        a, b = n2n.pairs[choice[1, 0, i, j]].tolist()
        assert g1[1, 0, i, j] == y[1, 0, i * sz + a // sx, j * sx + a % sx]
        assert g2[1, 0, i, j] == y[1, 0, i * sz + b // sx, j * sx + b % sx]
    loss = n2n(lambda x: x * 0.5, y / y.max(), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # polyphase inference is the identity for the identity network
    assert torch.equal(S.subsampled_forward(lambda x: x, y, (3, 4)), y)


def test_validation_loss_is_repeatable():
    corr = _corr(1, 2)
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    noisy = torch.rand(6, 1, 16, 16)
    for method in S.METHODS:
        obj = S.make_objective(method, corr)
        a = S.validation_loss(obj, model, noisy, batch_size=4, amp=False, seed=5)
        b = S.validation_loss(obj, model, noisy, batch_size=4, amp=False, seed=5)
        assert a == b and math.isfinite(a)
    with pytest.raises(ValueError, match="unknown self-supervised method"):
        S.make_objective("noise2void", corr)
    assert S.parse_correlation("2,3") == (2, 3)
    with pytest.raises(ValueError, match="AXIAL,LATERAL"):
        S.parse_correlation("2")
