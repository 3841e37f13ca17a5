"""The norm block (BatchRenorm -> LeakyReLU -> Dropout, training) forward and forward+backward:
the fused block on each backend present beside the compositions it replaces.

Each benchmark first checks its implementation on its own input (batch_renorm_act_cases.check_block);
a backend that is not here is skipped with the reason. The forward rows run without autograd
recording; the forward+backward rows take dx, dweight and dbias with autograd.grad and record
what the step keeps for backward (saved tensors' bytes; CUDA's peak allocation on a GPU).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from .batch_renorm_cases import renorm_bytes, renorm_input
from .common import Unavailable, autograd_memory, rotation_count, tensor_bytes
from .conftest import DEVICE, SIZE, checked_or_skipped
from .batch_renorm_act_cases import BLOCK_IMPLS, block_cases, block_impl, check_block, forward_backward

CASES = {case.id: case for case in block_cases(SIZE, DEVICE)}


def _setup(impl, case):
    if impl == "reference" and case.full and DEVICE.type == "cpu":
        pytest.skip("the reference block's torch Philox port takes ~1 minute a call at batch 32 "
                    "on a CPU; it is timed at the small size")
    try:
        module = block_impl(impl, case.shape[1], DEVICE, case.dtype)
    except Unavailable as e:
        pytest.skip(str(e))
    x = renorm_input(case.shape, case.dtype, case.channels_last, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    dy = torch.randn(case.shape, generator=g, device=DEVICE).to(case.dtype)
    notes = []
    # the first call compiles under torch.compile; a wrong kernel raises AssertionError
    checked_or_skipped(lambda: notes.append(check_block(impl, module, x, dy, DEVICE)),
                       compiled=impl.endswith("-compiled"))
    if notes[0].startswith("FAILED"):
        warnings.warn(f"{impl} {case.label}: {notes[0]}")  # a baseline: timed and marked
    # Rotate through several inputs (and output gradients) so reads come from memory.
    k = rotation_count(tensor_bytes(case.shape, case.dtype), DEVICE)
    xs = [x] + [renorm_input(case.shape, case.dtype, case.channels_last, DEVICE, seed=i + 1)
                for i in range(k - 1)]
    dys = [dy] + [torch.randn_like(x, dtype=torch.float32).to(case.dtype) for _ in range(k - 1)]
    return module, xs, dys, k, notes[0]


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(timed, case, impl):
    case = CASES[case]
    module, xs, _, k, check = _setup(impl, case)
    with torch.no_grad():
        module(xs[0])  # a no-grad graph of its own under torch.compile
    calls = iter(range(10**9))

    def forward():
        with torch.no_grad():
            return module(xs[next(calls) % k])

    timed("norm-block-forward", impl, case.label, forward,
          renorm_bytes(case.shape, case.dtype, backward=False), buffers=k, full_size=case.full, check=check)


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(timed, case, impl):
    case = CASES[case]
    module, xs, dys, k, check = _setup(impl, case)
    xs = [x.requires_grad_() for x in xs]
    memory = autograd_memory(lambda: forward_backward(module, xs[0], dys[0]), DEVICE)
    calls = iter(range(10**9))

    def step():
        i = next(calls) % k
        return forward_backward(module, xs[i], dys[i])

    timed("norm-block-forward-backward", impl, case.label, step,
          renorm_bytes(case.shape, case.dtype, backward=True), buffers=k, full_size=case.full,
          check=check, **memory)
