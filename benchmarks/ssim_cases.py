"""SSIM benchmark cases: the package's batched SSIM (fp64, fp32, compiled) against
scikit-image, checked to agree with it to 1e-4 per image (tests/test_metrics.py). Bytes: both
images read once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import assert_close, compile_fresh

SSIM_IMPLS = ("skimage", "ssim-fp64", "ssim-fp32", "ssim-fp32-compiled")


def ssim_pair(shape, device, seed=0):
    """(pred, target) in [0, 1]: a smooth target and a noisy prediction of it."""
    g = torch.Generator(device=device).manual_seed(seed)
    target = torch.rand(shape, generator=g, device=device)
    target = F.avg_pool2d(target, 5, stride=1, padding=2)
    pred = (target + 0.1 * torch.randn(shape, generator=g, device=device)).clamp(0, 1)
    return pred, target


def ssim_impl(name: str, device: torch.device):
    from speckle_models.metrics.psnr_ssim import ssim

    if name == "skimage":
        from skimage.metrics import structural_similarity

        def skimage_ssim(pred, target):
            p, t = pred.cpu().double().numpy(), target.cpu().double().numpy()
            return torch.tensor([structural_similarity(
                p[i, 0], t[i, 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False) for i in range(p.shape[0])])
        return skimage_ssim
    if name == "ssim-fp64":
        return lambda pred, target: ssim(pred, target, dtype=torch.float64)
    if name == "ssim-fp32":
        return lambda pred, target: ssim(pred, target, dtype=torch.float32)
    if name == "ssim-fp32-compiled":
        return compile_fresh(lambda pred, target: ssim(pred, target, dtype=torch.float32))
    raise ValueError(f"unknown implementation {name!r}")


def check_ssim(name: str, fn, pred, target) -> None:
    """Agreement with scikit-image to 1e-4 per image (tests/test_metrics.py)."""
    if name == "skimage":
        return
    expected = ssim_impl("skimage", pred.device)(pred, target)
    assert_close(fn(pred, target).cpu(), expected, atol=1e-4, rtol=0.0, name=f"{name} ssim")
