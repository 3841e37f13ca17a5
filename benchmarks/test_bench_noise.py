"""Speckle noise: the fused uint8 batch maker and add_speckle_noise against the torch reference.

The reference draws from torch's generator and the kernels from a counter-based Philox stream,
so the check holds a kernel to the exact values of its documented stream (and the compiled
reference to the eager one's distribution); see benchmarks.check_noise.
"""
from __future__ import annotations

import pytest
import torch

from .common import Unavailable, tensor_bytes
from .noise_cases import NOISE_IMPLS, batch_maker_bytes, check_noise, noise_impl, noise_shapes
from .conftest import DEVICE, SIZE, checked_or_skipped

SHAPES = noise_shapes(SIZE, DEVICE)
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _impl(name, op):
    try:
        return noise_impl(name, op, DEVICE)
    except Unavailable as e:
        pytest.skip(str(e))


def _checked(name, fn, op, x, out_dtype=torch.float32):
    checked_or_skipped(lambda: check_noise(name, fn, op, x, out_dtype), compiled=name == "reference-compiled")
    return "passed" if name != "reference" else "is the reference"


@pytest.mark.parametrize("impl", NOISE_IMPLS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batch_maker(timed, shape, out_dtype, impl):
    fn = _impl(impl, "batch")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    u8 = torch.randint(0, 256, shape, generator=g, device=DEVICE, dtype=torch.uint8)
    check = _checked(impl, fn, "batch", u8, out_dtype)
    fn(u8, out_dtype)
    label = f"make_noisy_batch {'x'.join(map(str, shape))} u8->{'fp32' if out_dtype == torch.float32 else 'bf16'}"
    timed("noise", impl, label, lambda: fn(u8, out_dtype), batch_maker_bytes(shape, out_dtype),
          check=check)


@pytest.mark.parametrize("impl", NOISE_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_add_speckle_noise(timed, shape, impl):
    fn = _impl(impl, "add")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.rand(shape, generator=g, device=DEVICE)
    check = _checked(impl, fn, "add", x)
    fn(x)
    timed("noise", impl, f"add_speckle_noise {'x'.join(map(str, shape))} fp32", lambda: fn(x),
          2 * tensor_bytes(shape, torch.float32), check=check)
