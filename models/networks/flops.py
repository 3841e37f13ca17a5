"""A training step's FLOP count and the device's bf16 peak, for speckle-train and the
benchmarks (one table, here).

The count is torch.utils.flop_counter's (convolutions and matmuls; norms and pointwise ops
count 0), forward and backward, taken once on a copy of the model under a forked RNG, so the
run it measures trains exactly as it would without it.
"""
from __future__ import annotations

import copy

import torch

# Dense bf16 tensor-core rates. H100/H200: the ~790 TFLOP/s a large bf16 matmul sustains there
# (the spec sheet says 989); the others are spec-sheet numbers.
PEAK_BF16_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The bf16 peak of `device`, or None where unknown (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((rate for key, rate in PEAK_BF16_FLOPS.items() if key in name), None)


def step_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward + backward of `model` on `example` (a batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = copy.deepcopy(model).train()
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        twin(example).float().square().mean().backward()
    return int(counter.get_total_flops())


def throughput_note(flops_per_image: float, images: int, seconds: float, device: torch.device) -> dict:
    """Achieved FLOP/s over `images` in `seconds`, and its fraction of the bf16 peak."""
    rate = flops_per_image * images / max(seconds, 1e-9)
    peak = peak_bf16_flops(device)
    return {"tflops": rate / 1e12, "bf16_peak_fraction": None if peak is None else rate / peak}


def forward_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward of `model` on `example` (a batch), without gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())
