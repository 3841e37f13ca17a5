"""Inference: frames/s of Di-Conv-AE, D-U-Net and Br-U-Net at 128x128, 420x580 and 480x640 on
each path of speckle-denoise's engine (inference_cases.py: paths, sizes, weights, the checks),
with GFLOP a frame, GFLOP/s and the fraction of this device's matmul peak measured in the
same session (the matmul_rates fixture).
"""
from __future__ import annotations

import pytest

from speckle_models import MODEL_NAMES

from .inference_cases import (COMPILED_IMPLS, INFER_IMPLS, INFER_SHAPES, LOW_PRECISION, check_inference,
                              frame_gflop, infer_case, infer_impl, infer_setup, skip_reason)
from .conftest import DEVICE, SIZE, checked_or_skipped


@pytest.mark.parametrize("impl", INFER_IMPLS)       # varies fastest: the cached case is reused
@pytest.mark.parametrize("network", MODEL_NAMES)
@pytest.mark.parametrize("shape", INFER_SHAPES)
def test_inference(timed, benchmark, matmul_rates, shape, network, impl):
    reason = skip_reason(impl, network, shape, SIZE, DEVICE)
    if reason:
        pytest.skip(reason)
    model, x, expected = infer_case(network, shape, SIZE, str(DEVICE))
    compiled = impl in COMPILED_IMPLS
    holder = {}
    checked_or_skipped(lambda: holder.setdefault("fn", infer_impl(impl, model, x)), compiled=compiled)
    fn = holder["fn"]
    checked_or_skipped(lambda: check_inference(impl, fn, x, expected), compiled=compiled)
    if compiled:
        fn(x)  # once with the default flags outside the timing (the check ran with TF32 off)
    batch, _, h, w = x.shape
    gflop = frame_gflop(network, shape, SIZE, str(DEVICE))
    peak_name = LOW_PRECISION.get(impl, "fp32")
    stats = timed("inference", impl, f"{network} {shape} {batch}x1x{h}x{w}",
                  lambda: fn(x), None, check="is the reference" if impl == "eager" else "passed",
                  network=network, width=infer_setup(SIZE, DEVICE)[1], gflop_per_frame=gflop,
                  peak_dtype=peak_name, matmul_peak_gflops={k: (v or 0) / 1e9 for k, v in matmul_rates.items()})
    if stats is not None:
        rate = gflop * batch / stats.median
        peak = matmul_rates.get(peak_name)
        benchmark.extra_info.update(frames_per_s=batch / stats.median, gflops=rate,
                                    fraction_of_peak=rate * 1e9 / peak if peak else None)
