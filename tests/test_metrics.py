"""PSNR and SSIM against scikit-image on 8-bit images (random, structured, odd sizes)."""
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from speckle_models.metrics.psnr_ssim import from_normalized, gaussian_window, psnr, ssim


def sk_ssim(a, b):
    return structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def structured_pair(h, w, seed):
    """A smooth phantom-like image with edges and its noisy, blurred copy, both 8-bit."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 40 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    img += 100 * (((yy - h / 2) ** 2 + (xx - w / 3) ** 2) < (min(h, w) / 4) ** 2)
    img[: h // 5] = 250  # a bright band that touches the border
    noisy = img * (1 + 0.3 * rng.standard_normal(img.shape)) + 8 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), np.clip(noisy, 0, 255).astype(np.uint8)


def random_pair(h, w, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 41, (h, w)), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("make", [random_pair, structured_pair])
@pytest.mark.parametrize("hw", [(11, 11), (17, 29), (64, 64), (97, 130)])
def test_ssim_matches_skimage(make, hw):
    pairs = [make(*hw, seed) for seed in range(3)]
    expected = np.array([sk_ssim(a, b) for a, b in pairs])
    pred = torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None].float() / 255
    target = torch.from_numpy(np.stack([b for _, b in pairs]))[:, None].float() / 255
    got = ssim(pred, target, data_range=1.0).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The same in 8-bit units, and in float32 arithmetic (for the device path).
    np.testing.assert_allclose(ssim(pred * 255, target * 255, data_range=255).numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(ssim(pred, target, dtype=torch.float32).numpy(), expected, atol=1e-4)


def test_ssim_multichannel_and_shapes():
    a, b = structured_pair(40, 48, 0)
    x = torch.from_numpy(a).double() / 255
    y = torch.from_numpy(b).double() / 255
    one = ssim(x, y)
    assert one.dim() == 0
    assert ssim(x[None], y[None]).shape == (1,)
    # Two identical channels average to the one-channel value (scikit-image's channel_axis rule).
    two = ssim(torch.stack([x, x])[None], torch.stack([y, y])[None])
    assert torch.allclose(two[0], one)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_psnr_matches_skimage():
    for seed in range(3):
        a, b = structured_pair(33, 47, seed)
        expected = peak_signal_noise_ratio(a, b, data_range=255)
        got = psnr(torch.from_numpy(a).float() / 255, torch.from_numpy(b).float() / 255)
        assert got.item() == pytest.approx(expected, abs=1e-4)


def test_psnr_per_image_and_identical():
    x = torch.rand(4, 1, 8, 8)
    y = x.clone()
    y[1] += 0.1
    out = psnr(x, y)
    assert out.shape == (4,)
    assert torch.isinf(out[0]) and out[1].item() == pytest.approx(20.0, abs=1e-6)


def test_from_normalized_round_trip():
    v = torch.rand(2, 1, 5, 5)
    assert torch.allclose(from_normalized((v - 0.5) / 0.5), v)


def test_gaussian_window():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and torch.isclose(g.sum(), torch.tensor(1.0, dtype=g.dtype))
    with pytest.raises(ValueError):
        gaussian_window(10)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_errors(fn):
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="shapes differ"):
        fn(x, torch.rand(2, 1, 16, 15))
    with pytest.raises(ValueError, match="data_range"):
        fn(x, x, data_range=0)
    with pytest.raises(ValueError):
        fn(torch.rand(16), torch.rand(16))
    with pytest.raises(TypeError):
        fn(x.numpy(), x)


def test_ssim_window_too_large():
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.rand(1, 1, 10, 30), torch.rand(1, 1, 10, 30))
