"""Batched SSIM (speckle_models.metrics.psnr_ssim.ssim) against scikit-image, its reference.

scikit-image runs image by image on the CPU (float64 numpy); the torch versions take the whole
batch on the benchmark's device. Each is first checked against scikit-image to 1e-4 per image.
"""
from __future__ import annotations

import pytest
import torch

from .common import BATCH, IMAGE, tensor_bytes
from .ssim_cases import SSIM_IMPLS, check_ssim, ssim_impl, ssim_pair
from .conftest import DEVICE, SIZE, checked_or_skipped

SHAPE = (BATCH if SIZE == "full" else 8, 1, IMAGE, IMAGE)


@pytest.mark.parametrize("impl", SSIM_IMPLS)
def test_ssim(timed, impl):
    fn = ssim_impl(impl, DEVICE)
    pred, target = ssim_pair(SHAPE, DEVICE)
    checked_or_skipped(lambda: check_ssim(impl, fn, pred, target), compiled=impl == "ssim-fp32-compiled")
    fn(pred, target)
    timed("ssim", impl, f"ssim {'x'.join(map(str, SHAPE))} fp32 in", lambda: fn(pred, target),
          2 * tensor_bytes(SHAPE, torch.float32),
          check="passed" if impl != "skimage" else "is the reference",
          ran_on="cpu (numpy)" if impl == "skimage" else DEVICE.type)
