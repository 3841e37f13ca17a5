"""BatchRenorm forward and forward+backward: every implementation present, side by side.

Each benchmark first checks its implementation against the reference on the same input
(output, running buffers, gradients), so a fast wrong kernel fails instead of winning.
The forward runs in training mode (statistics, r/d, buffer update) without autograd
recording; forward+backward takes dx, dweight and dbias with autograd.grad.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from .common import Unavailable, rotation_count, tensor_bytes
from .batch_renorm_cases import (RENORM_IMPLS, RenormState, check_renorm, forward_backward,
                                 renorm_bytes, renorm_cases, renorm_impl, renorm_input)
from .conftest import DEVICE, SIZE

# Seen with torch 2.13 on CPU: torch.compile(batch_renorm_reference) returns dx (and dweight)
# off by ~1e-2 relative when the call also updates the running buffers (momentum 0 agrees). The min-cut partitioner
# recomputes r = sigma / running_std in the backward, after the forward has updated
# running_std in place; pytorch/pytorch PR #197039 ("Don't recompute reads of mutated inputs")
# describes this failure and is open. The forward and the buffers are right.
COMPILED_DX_BUG = ("torch.compile's partitioner recomputes r from running_std in the backward "
                   "after the forward updated it (pytorch/pytorch PR #197039, open)")
CASES = {case.id: case for case in renorm_cases(SIZE, DEVICE)}


def _setup(impl, case, backward):
    try:
        fn = renorm_impl(impl, DEVICE, case.dtype)
    except Unavailable as e:
        pytest.skip(str(e))
    x = renorm_input(case.shape, case.dtype, case.channels_last, DEVICE)
    check = "passed" if impl != "reference" else "is the reference"
    try:  # the first call compiles under torch.compile
        check_renorm(impl, fn, x, backward=backward, device=DEVICE)
    except AssertionError as e:
        if not (impl == "reference-compiled" and backward
                and any(f" {g}:" in str(e) for g in ("dx", "dweight", "dbias"))):
            raise
        # A baseline, not ours: timed, and marked wrong in extra_info and the report.
        check = f"FAILED: {e}. {COMPILED_DX_BUG}"
        warnings.warn(f"reference-compiled {case.label}: {check}")
    except Exception as e:
        if impl != "reference-compiled":
            raise
        pytest.skip(f"torch.compile failed here: {type(e).__name__}: {e}"[:500])
    # Rotate through several inputs (and output gradients) so reads come from memory.
    k = rotation_count(tensor_bytes(case.shape, case.dtype), DEVICE)
    xs = [x] + [renorm_input(case.shape, case.dtype, case.channels_last, DEVICE, seed=i + 1)
                for i in range(k - 1)]
    state = RenormState(case.shape[1], DEVICE, grad=backward)
    return fn, xs, state, k, check


def _warm(fn, xs, state, backward):
    # The timed state and inputs once outside the clock (a compiled graph may re-guard on them).
    if backward:
        forward_backward(fn, xs[0], state, torch.ones_like(xs[0]))
    else:
        with torch.no_grad():
            fn(xs[0], state)


@pytest.mark.parametrize("impl", RENORM_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(timed, case, impl):
    case = CASES[case]
    fn, xs, state, k, check = _setup(impl, case, backward=False)
    _warm(fn, xs, state, backward=False)
    calls = iter(range(10**9))

    def forward():
        with torch.no_grad():
            return fn(xs[next(calls) % k], state)

    timed("batchrenorm-forward", impl, case.label, forward,
          renorm_bytes(case.shape, case.dtype, backward=False), buffers=k, full_size=case.full, check=check)


@pytest.mark.parametrize("impl", RENORM_IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward(timed, case, impl):
    case = CASES[case]
    fn, xs, state, k, check = _setup(impl, case, backward=True)
    xs = [x.requires_grad_() for x in xs]
    dys = [torch.randn_like(x, dtype=torch.float32).to(case.dtype) for x in xs]
    _warm(fn, xs, state, backward=True)
    calls = iter(range(10**9))

    def step():
        i = next(calls) % k
        return forward_backward(fn, xs[i], state, dys[i])

    timed("batchrenorm-forward-backward", impl, case.label, step,
          renorm_bytes(case.shape, case.dtype, backward=True), buffers=k, full_size=case.full, check=check)
