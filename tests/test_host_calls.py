"""What a layer call asks of the host (speckle_kernels/testing/host_calls.py): no tensor made
from Python data (torch.tensor: an allocation and a host-to-device copy a call on a GPU), no rng
tensor where no mask is drawn, one draw of (seed, offset) where one is. Every backend present.
"""
from __future__ import annotations

import pytest
import torch

from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct2d
from speckle_kernels.testing.backends import BACKENDS, require
from speckle_kernels.testing.host_calls import HostCalls


@pytest.mark.parametrize("dropout", [None, 0.0, 0.2], ids=["renorm", "block", "block-dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_call_makes_no_host_tensors(backend, dropout):
    device = require(backend)
    layer = (FusedBatchRenorm2d(4, backend=backend) if dropout is None
             else FusedBatchRenormAct2d(4, dropout=dropout, backend=backend)).to(device)
    x = torch.randn(2, 4, 3, 5, device=device, requires_grad=True)
    layer(x).sum().backward()  # first calls may set things up once
    with HostCalls(input_device=device) as calls:
        layer(x).sum().backward()
    assert calls.by_op["lift_fresh"] == 0, "a tensor made from Python data in the call"
    assert calls.by_op["zeros"] == 0, "an rng tensor (or other zeros) made in the call"
    assert calls.by_op["randint"] == (1 if dropout else 0), calls.by_op
    assert calls.host_created == 0
    if backend == "triton":
        assert calls.triton_launches > 0  # the count sees the kernels
