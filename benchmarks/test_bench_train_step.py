"""One optimizer step (forward, MSE loss, backward, Adamax) of the paper's U-Nets, fp32.

Br-U-Net with each fused backend present, with the plain-torch reference layer, and D-U-Net
with nn.BatchNorm2d (the floor), eager; Br-U-Net on its default fused backend and D-U-Net also
under torch.compile and as one CUDA graph (train_step_cases.TRAIN_ROWS). Convolutions dominate;
the gap between the rows is what the norm layers cost. No bytes floor exists for a whole step:
a row reports images per second, the step's FLOP count (torch.utils.flop_counter, taken once in
setup) and FLOP/s, its fraction of the device's bf16 peak where known (speckle_models.networks.flops:
the one table; none on a CPU), and what the step keeps for backward (saved tensors' bytes, and
CUDA's peak allocation on a GPU; for a graph row, of its last eager warm-up step).
"""
from __future__ import annotations

import pytest
import torch

from speckle_models.networks.flops import step_flops, throughput_note

from .common import Unavailable, autograd_memory
from .conftest import DEVICE, SIZE, checked_or_skipped
from .train_step_cases import (TRAIN_ROWS, capture_step, check_train_step, train_batch, train_model,
                               train_shape, train_step_fn)

BATCH, IMAGE = train_shape(SIZE, DEVICE)


@pytest.mark.parametrize("impl, mode", TRAIN_ROWS, ids=[f"{i}-{m}" for i, m in TRAIN_ROWS])
def test_train_step(timed, benchmark, impl, mode):
    if mode == "graph" and DEVICE.type != "cuda":
        pytest.skip("a CUDA graph needs a CUDA device (this run is on the CPU)")
    try:
        model, lr = train_model(impl, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    check_train_step(impl, model, BATCH, IMAGE, DEVICE)
    noisy, clean = train_batch(BATCH, IMAGE, DEVICE)
    flops = step_flops(model, noisy)
    step = train_step_fn(model, lr, mode, fullgraph=impl.startswith("br-unet"))
    # the first call compiles; for Br-U-Net fullgraph turns a graph break into an error
    checked_or_skipped(lambda: step(noisy, clean),
                       compiled=mode == "compiled" and not impl.startswith("br-unet"))
    memory = autograd_memory(lambda: step(noisy, clean), DEVICE)
    call = capture_step(step, noisy, clean, DEVICE) if mode == "graph" else (lambda: step(noisy, clean))
    checked = impl.startswith("br-unet-") and impl != "br-unet-reference"
    stats = timed("train-step", impl if mode == "eager" else f"{impl}-{mode}",
                  f"train step {BATCH}x1x{IMAGE}x{IMAGE} fp32", call, None, mode=mode, flops=flops,
                  check="passed (eager kernels)" if checked else "n/a", **memory)
    if stats is not None:
        note = throughput_note(flops / BATCH, BATCH, stats.median, DEVICE)
        benchmark.extra_info.update(images_per_s=BATCH / stats.median, flop_per_s=note["tflops"] * 1e12,
                                    bf16_peak_fraction=note["bf16_peak_fraction"])
