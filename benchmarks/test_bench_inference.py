"""Inference: images/s of Di-Conv-AE, D-U-Net and Br-U-Net at 128x128, 420x580 and 480x640,
eager vs folded norms vs torch.compile (inference_cases.py: sizes, weights, the check).

No bytes floor exists for a whole network: each row records images per second.
"""
from __future__ import annotations

import pytest

from speckle_models import MODEL_NAMES

from .inference_cases import (INFER_IMPLS, INFER_SHAPES, check_inference, infer_case, infer_impl,
                              infer_setup, skip_reason)
from .conftest import DEVICE, SIZE, checked_or_skipped


@pytest.mark.parametrize("impl", INFER_IMPLS)       # varies fastest: the cached case is reused
@pytest.mark.parametrize("network", MODEL_NAMES)
@pytest.mark.parametrize("shape", INFER_SHAPES)
def test_inference(timed, benchmark, shape, network, impl):
    reason = skip_reason(impl, network, shape, SIZE, DEVICE)
    if reason:
        pytest.skip(reason)
    model, x, expected = infer_case(network, shape, SIZE, str(DEVICE))
    fn = infer_impl(impl, model)
    checked_or_skipped(lambda: check_inference(impl, fn, x, expected), compiled=impl == "compiled")
    if impl == "compiled":
        fn(x)  # once with the default flags outside the timing (the check ran with TF32 off)
    batch, _, h, w = x.shape
    stats = timed("inference", impl, f"{network} {shape} {batch}x1x{h}x{w} fp32",
                  lambda: fn(x), None, check="is the reference" if impl == "eager" else "passed",
                  network=network, width=infer_setup(SIZE, DEVICE)[1])
    if stats is not None:
        benchmark.extra_info["images_per_s"] = batch / stats.median
