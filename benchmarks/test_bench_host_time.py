"""Host cost of one layer call: a training forward+backward of FusedBatchRenorm2d and
FusedBatchRenormAct2d (without and with dropout) at (2, 8, 8, 8), where the device work is
negligible, so the time is the host's: Python, the dispatcher, the launches.

Each row records beside the time (speckle_kernels/testing/host_calls.py): the ops the call
dispatches (on a GPU each one that computes is a kernel launch), the Triton launches (outside the
dispatcher), the tensors it creates outright, and of those the ones on the host while the input
is on a GPU (a layer should make none: they cost an allocation and a copy a call). The setup
checks y and dx against the reference layer on the same input, so a fast wrong call cannot win.
"""
from __future__ import annotations

import copy

import pytest
import torch

from .common import KERNEL_BACKENDS, Unavailable, assert_close, probe_backend
from .conftest import DEVICE

SHAPE = (2, 8, 8, 8)
LAYERS = ("renorm", "block", "block-dropout")


def _layer(kind: str, backend: str) -> torch.nn.Module:
    from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct2d

    if kind == "renorm":
        layer = FusedBatchRenorm2d(SHAPE[1], backend=backend)
    else:
        layer = FusedBatchRenormAct2d(SHAPE[1], dropout=0.05 if kind == "block-dropout" else 0.0, backend=backend)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(20000)
        layer.running_std.fill_(1.5)
    return layer.to(DEVICE).train()


def _call(layer, x, dy):
    y = layer(x)
    return torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)


@pytest.mark.parametrize("backend", ("reference",) + KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", LAYERS)
def test_host_time(timed, kind, backend):
    from speckle_kernels.testing.host_calls import HostCalls

    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = (torch.randn(SHAPE, generator=g, device=DEVICE) * 2 + 1).requires_grad_()
    dy = torch.randn(SHAPE, generator=g, device=DEVICE)
    try:
        probe_backend(backend, DEVICE, lambda: _call(_layer(kind, backend), x, dy))
    except Unavailable as e:
        pytest.skip(str(e))
    layer = _layer(kind, backend)
    reference = copy.deepcopy(layer)
    reference.backend = "reference"
    torch.manual_seed(1)
    got = _call(layer, x, dy)
    torch.manual_seed(1)  # the same mask: both draw it from the generator's same state
    want = _call(reference, x, dy)
    for name, a, b in zip(("dx", "dweight", "dbias"), got, want):
        assert_close(a, b, atol=1e-4 * (b.abs().max().item() + 1), rtol=1e-4, name=name)
    with HostCalls(input_device=DEVICE) as calls:
        _call(layer, x, dy)
    nbytes = 8 * x.numel() * x.element_size()  # the block's 3 + 5 passes over a tensor
    # 200 rounds whatever the size: a call is ~0.1-1 ms, and the host's time is what is measured
    timed("host-time", f"{kind}-{backend}", "x".join(map(str, SHAPE)), lambda: _call(layer, x, dy), nbytes,
          rounds_warmup=(200, 20), ops=calls.ops, created=calls.created, host_created=calls.host_created,
          triton_launches=calls.triton_launches)
