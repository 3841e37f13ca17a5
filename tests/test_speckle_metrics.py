"""Speckle metrics against values known in closed form, with tolerances derived from the sample.

Simulated speckle here has independent pixels (real speckle is correlated over a resolution
cell, which would lower the effective sample size), so n = pixels in the region. Estimates of
mu / sigma are checked within 5 standard errors from the delta method:

    Var(mu^/sigma^) ~= (1 - R g1 + R^2 (k - 1) / 4) / n,  R = mu / sigma, g1 skewness, k kurtosis
    Var(sigma^)     ~= (mu4 - sigma^4) / (4 sigma^2 n),   Var(ENL^) ~= (2 R)^2 Var(R^)

A 5-SE excursion of a normal estimate has probability 5.7e-7, so the ~40 comparisons below fail
by chance with probability < 3e-5. Every test draws fresh random data (seeded per test by
conftest.py, so a failure replays).
"""
import math

import numpy as np
import pytest
import torch

from speckle_models.metrics.speckle_stats import (box_mask, cnr, enl, gcnr, homogeneous_windows, region_stats,
                                     speckle_snr)

Z = 5.0  # standard errors allowed
N, H, W = 4, 256, 256
DB = 10.0 / math.log(10.0)  # 10 log10(v) = DB * ln(v)


def se_ratio(mean, var, mu3, mu4, n):
    """Standard error of the sample mu / sigma (delta method), from the central moments."""
    r = mean / math.sqrt(var)
    g1, kurt = mu3 / var ** 1.5, mu4 / var ** 2
    return math.sqrt((1 - r * g1 + r * r * (kurt - 1) / 4) / n)


def central_from_raw(m1, m2, m3, m4):
    return (m1, m2 - m1 ** 2, m3 - 3 * m1 * m2 + 2 * m1 ** 3,
            m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4)


def complex_gaussian(*shape):
    """Fully developed speckle: the sum of many random phasors, re and im ~ N(0, 1)."""
    return torch.complex(torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64))


def per_image_masks():
    """Random regions, a different pixel count in every image (about half the pixels)."""
    return torch.rand(N, H, W) < torch.linspace(0.3, 0.7, N).view(-1, 1, 1)


def test_rayleigh_envelope_snr():
    env = complex_gaussian(N, H, W).abs()  # Rayleigh(1): E[X^k] = 2^(k/2) Gamma(1 + k/2)
    moments = central_from_raw(*(2 ** (k / 2) * math.gamma(1 + k / 2) for k in (1, 2, 3, 4)))
    expected = math.sqrt(math.pi / (4 - math.pi))
    assert moments[0] / math.sqrt(moments[1]) == pytest.approx(expected, rel=1e-12)
    for mask in (torch.ones(H, W, dtype=torch.bool), (16, 32, 200, 180), per_image_masks()):
        counts = region_stats(env, mask)[2]
        got = speckle_snr(env, mask)
        assert got.shape == (N,) and got.dtype == torch.float64
        for value, n in zip(got.tolist(), counts.tolist()):
            assert abs(value - expected) <= Z * se_ratio(*moments, n), (value, expected, n)
    # (N, 1, H, W) and float32 images give the same per-image values
    torch.testing.assert_close(speckle_snr(env[:, None], (0, 0, H, W)), speckle_snr(env, (0, 0, H, W)))
    torch.testing.assert_close(speckle_snr(env.float(), (0, 0, H, W)), speckle_snr(env, (0, 0, H, W)),
                               rtol=1e-5, atol=0)


def test_log_compressed_speckle_std():
    # 20 log10 |z| = DB * ln |z|^2 with |z|^2 ~ 2 Exp(1); ln Exp(1) has variance pi^2 / 6
    # (trigamma(1)), third central moment -2 zeta(3) and fourth 3 pi^4 / 20 (kurtosis 5.4).
    log_env = 20 * torch.log10(complex_gaussian(N, H, W).abs())
    var = math.pi ** 2 / 6
    mu4 = 3 * math.pi ** 4 / 20
    expected = DB * math.pi / math.sqrt(6)
    assert expected == pytest.approx(5.5700, abs=1e-4)
    for mask in (torch.ones(H, W, dtype=torch.bool), per_image_masks()):
        mean, std, count = region_stats(log_env, mask)
        for s, m, n in zip(std.tolist(), mean.tolist(), count.tolist()):
            se_std = DB * math.sqrt((mu4 - var ** 2) / (4 * var * n))
            assert abs(s - expected) <= Z * se_std, (s, expected, n)
            # the mean: DB (ln 2 - Euler's gamma) ~= 0.50 dB
            assert abs(m - DB * (math.log(2) - 0.5772156649015329)) <= Z * DB * math.sqrt(var / n)


@pytest.mark.parametrize("looks", [1, 4])
def test_enl_of_multilook_intensity(looks):
    # The mean of L independent |z|^2 is Gamma(L, 2): ENL = mean^2 / var = L. Gamma(L) moments
    # (scale 1): mean L, var L, mu3 2L, mu4 3L^2 + 6L.
    intensity = complex_gaussian(looks, N, H, W).abs().square().mean(0)
    se_r = se_ratio(looks, looks, 2 * looks, 3 * looks ** 2 + 6 * looks, H * W)
    se_enl = 2 * math.sqrt(looks) * se_r
    got = enl(intensity, torch.ones(H, W, dtype=torch.bool))
    assert got.shape == (N,)
    assert (got - looks).abs().max().item() <= Z * se_enl, (got, looks, se_enl)


def test_cnr_of_two_gaussian_regions():
    mu_a, sd_a, mu_b, sd_b = 3.0, 1.0, 1.0, 2.0
    img = torch.empty(N, H, W, dtype=torch.float64)
    img[:, :, : W // 2] = mu_a + sd_a * torch.randn(N, H, W // 2, dtype=torch.float64)
    img[:, :, W // 2:] = mu_b + sd_b * torch.randn(N, H, W // 2, dtype=torch.float64)
    box_a, box_b = (8, 8, 240, 100), (8, 140, 200, 110)
    na, nb = 240 * 100, 200 * 110
    # Delta method, C = |D| / sqrt(S): for Gaussian samples the mean and variance are
    # independent, Var(mean diff) = sa^2/na + sb^2/nb, Var(s^2) = 2 s^4 / n.
    d, s = mu_a - mu_b, sd_a ** 2 + sd_b ** 2
    expected = abs(d) / math.sqrt(s)
    var_c = ((sd_a ** 2 / na + sd_b ** 2 / nb) / s
             + d * d / (4 * s ** 3) * (2 * sd_a ** 4 / na + 2 * sd_b ** 4 / nb))
    got = cnr(img, box_a, box_b)
    assert got.shape == (N,)
    assert (got - expected).abs().max().item() <= Z * math.sqrt(var_c)
    # symmetric in the two regions, and the same with mask tensors
    torch.testing.assert_close(cnr(img, box_b, box_a), got)
    torch.testing.assert_close(cnr(img, box_mask((H, W), *box_a), box_mask((H, W), box_b)), got)


def numpy_gcnr(a, b, bins):
    """The histogram overlap written out: common bins over the union range, normalized."""
    _, edges = np.histogram(np.concatenate([a, b]), bins=bins)
    f, _ = np.histogram(a, bins=edges)
    g, _ = np.histogram(b, bins=edges)
    f = f / f.sum()
    g = g / g.sum()
    return 1.0 - np.minimum(f, g).sum()


@pytest.mark.parametrize("bins", [256, 17])
def test_gcnr_matches_numpy_histogram_overlap(bins):
    # a hypoechoic lesion against tissue: Rayleigh envelopes of scale 1 and 1.6
    env = complex_gaussian(N, 64, 96).abs()
    inside = torch.rand(N, 64, 96) < 0.4
    img = torch.where(inside, env, 1.6 * env)
    got = gcnr(img, inside, ~inside, bins=bins)
    for i in range(N):
        x, m = img[i].numpy(), inside[i].numpy()
        expected = numpy_gcnr(x[m], x[~m], bins)
        # same edges and bin rule; only the order of summing <= bins terms of size <= 1 differs
        assert abs(got[i].item() - expected) <= 4 * bins * 2.0 ** -53, (got[i].item(), expected)
    assert 0.0 < got.min().item() and got.max().item() < 1.0


def test_gcnr_disjoint_is_one_and_identical_is_near_zero():
    # Disjoint ranges share no bin: overlap 0, gcnr exactly 1.
    h, w = 128, 256
    left = box_mask((h, w), 0, 0, h, w // 2)
    img = torch.rand(2, h, w, dtype=torch.float64) + 2.0 * left
    assert gcnr(img, left, ~left).tolist() == [1.0, 1.0]
    # One distribution in both regions, n = 2^17 pixels each, B = 256 bins: each bin's
    # difference of normalized counts is ~ normal with variance 2 p (1 - p) / n, so
    # E[gcnr] = 1/2 sum E|p^ - q^| ~= sqrt((B - 1) / (pi n)) for the uniform (p = 1 / B).
    # Moving one sample changes gcnr by <= 1/n, so McDiarmid bounds the deviation from the
    # mean by sqrt(ln(2 / delta) / n) with probability 1 - delta (delta = 1e-9 here). The
    # data-dependent range [min, max] moves the edges by ~1/n of the range: negligible.
    n_big, bins = 2 ** 17, 256
    img = torch.rand(3, 2, n_big, dtype=torch.float64)
    top = box_mask((2, n_big), 0, 0, 1, n_big)
    got = gcnr(img, top, ~top, bins=bins)
    mean = math.sqrt((bins - 1) / (math.pi * n_big))
    dev = math.sqrt(math.log(2 / 1e-9) / n_big)
    assert mean + dev < 0.04  # "about 0" at this sample size
    assert ((got - mean).abs() <= dev).all(), (got, mean, dev)


def planted(n_img=2, h=96, w=96):
    """Rayleigh speckle (CV 0.52) with two smooth 16x16 patches: CV 0.05 at box_a, 0.1 at box_b."""
    img = complex_gaussian(n_img, h, w).abs()
    boxes = [((10, 20, 16, 16), (60, 50, 16, 16)), ((70, 5, 16, 16), (4, 70, 16, 16))][:n_img]
    for i, (ba, bb) in enumerate(boxes):
        for (t, l, hh, ww), cv in ((ba, 0.05), (bb, 0.10)):
            img[i, t:t + hh, l:l + ww] = 5.0 * (1 + cv * torch.randn(hh, ww, dtype=torch.float64))
    return img, boxes


def test_homogeneous_windows_finds_planted_patches():
    img, boxes = planted()
    masks, found = homogeneous_windows(img, 16, count=3, return_boxes=True)
    assert masks.shape == (3, 2, 96, 96) and masks.dtype == torch.bool
    for i, (ba, bb) in enumerate(boxes):
        assert tuple(found[0, i].tolist()) == ba and tuple(found[1, i].tolist()) == bb
        assert torch.equal(masks[0, i], box_mask((96, 96), ba))
    assert (masks.sum((2, 3)) == 256).all() and (masks.sum(0) <= 1).all()  # non-overlapping
    # The masks feed the metrics directly; the chosen CVs (1 / SNR) come best first.
    cv = 1 / torch.stack([speckle_snr(img, m) for m in masks])
    assert (cv[1:] >= cv[:-1] * (1 - 1e-9)).all()
    # by="std" on log-compressed data picks the same patches (speckle's std is ~5.6 dB there)
    log_masks = homogeneous_windows(20 * torch.log10(img), (16, 16), count=2, by="std")
    assert torch.equal(log_masks, masks[:2])


def test_homogeneous_windows_many_and_too_many():
    # Greedy picking can leave gaps, but each pick excludes at most 31 x 31 of the 113 x 113
    # window positions of a 128 x 128 image, so ceil(113^2 / 31^2) = 14 windows always fit.
    img = complex_gaussian(1, 128, 128).abs()
    masks = homogeneous_windows(img, 16, count=14)
    assert (masks.sum(0) <= 1).all() and (masks.sum((2, 3)) == 256).all()
    img = img[:, :64, :64]
    with pytest.raises(ValueError, match="only 1 valid non-overlapping 40x40"):
        homogeneous_windows(img, 40, count=2)
    with pytest.raises(ValueError, match="larger than"):
        homogeneous_windows(img, 65)
    with pytest.raises(ValueError, match="count"):
        homogeneous_windows(img, 8, count=0)
    with pytest.raises(ValueError, match="by"):
        homogeneous_windows(img, 8, by="entropy")


def test_errors_name_the_problem():
    img = torch.rand(2, 32, 32) + 0.5
    full = torch.ones(32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image\[None\]"):
        speckle_snr(img[0], full)
    with pytest.raises(ValueError, match="3 channels"):
        enl(torch.rand(2, 3, 32, 32), full)
    with pytest.raises(ValueError, match="shape"):
        speckle_snr(torch.rand(1, 1, 2, 32, 32), full)
    with pytest.raises(TypeError, match="ndarray"):
        speckle_snr(img.numpy(), full)
    with pytest.raises(TypeError, match="torch.float32"):
        speckle_snr(img, full.float())
    with pytest.raises(ValueError, match=r"mask of shape \(32, 31\) does not match"):
        speckle_snr(img, torch.ones(32, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask_b of shape \(3, 32, 32\)"):
        cnr(img, full, torch.ones(3, 32, 32, dtype=torch.bool))
    per_image = torch.ones(2, 32, 32, dtype=torch.bool)
    per_image[1] = False
    with pytest.raises(ValueError, match=r"mask_a is empty in image\(s\) \[1\]"):
        gcnr(img, per_image, full)
    one_pixel = box_mask((32, 32), 3, 3, 1, 1)
    with pytest.raises(ValueError, match="fewer than 2 pixels"):
        speckle_snr(img, one_pixel)
    with pytest.raises(ValueError, match="does not fit"):
        cnr(img, (0, 0, 8, 8), (30, 30, 4, 4))
    with pytest.raises(ValueError, match="is empty"):
        box_mask((32, 32), 0, 0, 0, 5)
    with pytest.raises(TypeError, match="integers"):
        box_mask((32, 32), 0.5, 0, 4, 4)
    with pytest.raises(ValueError, match="bins"):
        gcnr(img, (0, 0, 8, 8), (8, 8, 8, 8), bins=0)


def test_constant_region_is_reported_not_hidden():
    img = torch.full((1, 8, 8), 3.0)
    assert math.isinf(speckle_snr(img, (0, 0, 4, 4)).item())
    assert gcnr(img, (0, 0, 4, 4), (4, 4, 4, 4)).item() == 0.0  # identical histograms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_device():
    img, boxes = planted()
    masks = homogeneous_windows(img.cuda(), 16, count=2)
    assert masks.device.type == "cuda"
    for fn in (speckle_snr, enl):
        torch.testing.assert_close(fn(img.cuda(), masks[0]).cpu(), fn(img, masks[0].cpu()))
    torch.testing.assert_close(gcnr(img.cuda(), masks[0], masks[1]).cpu(), gcnr(img, masks[0].cpu(), masks[1].cpu()))
