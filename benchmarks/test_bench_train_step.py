"""One optimizer step (forward, MSE loss, backward, Adamax) of the paper's U-Nets.

Br-U-Net with each fused backend present, with the plain-torch reference layer, and D-U-Net
with nn.BatchNorm2d (the floor). Convolutions dominate; the gap between the rows is what the
norm layers cost. No bytes floor exists for a whole step: the row reports images per second.
"""
from __future__ import annotations

import pytest
import torch

from .common import Unavailable
from .train_step_cases import (TRAIN_IMPLS, check_train_step, train_batch, train_model,
                               train_shape, train_step_fn)
from .conftest import DEVICE, SIZE

BATCH, IMAGE = train_shape(SIZE, DEVICE)


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_train_step(timed, benchmark, impl):
    try:
        model, lr = train_model(impl, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    check_train_step(impl, model, BATCH, IMAGE, DEVICE)
    noisy, clean = train_batch(BATCH, IMAGE, DEVICE)
    step = train_step_fn(model, lr)
    step(noisy, clean)
    stats = timed("train-step", impl, f"train step {BATCH}x1x{IMAGE}x{IMAGE} fp32",
                  lambda: step(noisy, clean), None,
                  check="passed" if impl.startswith("br-unet-") and impl != "br-unet-reference" else "n/a")
    if stats is not None:
        benchmark.extra_info["images_per_s"] = BATCH / stats.median
