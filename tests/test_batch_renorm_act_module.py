"""FusedBatchRenormAct1d/2d/3d: the norm block's module contract.

Drop-in state_dicts from FusedBatchRenorm*d, the masks (each training call's (seed, offset)
drawn from torch's generator of the input's device, so torch.manual_seed reproduces them),
nn.Dropout's semantics (off in eval, nothing drawn at p = 0), bad input, no host
synchronization, torch.compile (one graph) and opcheck of the C++ ops. Activation
checkpointing is tests/test_checkpoint.py's. Accuracy on every backend is tests/test_batch_renorm_act.py's.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import speckle_kernels as sk
from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct1d, FusedBatchRenormAct2d, FusedBatchRenormAct3d
from speckle_kernels.batch_renorm_act_contract import RNG_HIGH
from speckle_kernels.reference import batch_renorm_reference, dropout_keep_mask

from speckle_kernels.testing.backends import BACKENDS, require
from .helpers import assert_close, forbid_host_sync


def _x(*shape, device="cpu"):
    return (torch.randn(*shape, device=device) * 2 + 0.5).requires_grad_()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_renorm_state_dict_loads_strictly(dropout):
    src = FusedBatchRenorm2d(5)
    with torch.no_grad():
        for t in (src.weight, src.bias, src.running_mean):
            t.copy_(torch.randn(5))
        src.running_std.copy_(torch.rand(5) + 0.5)
        src.num_batches_tracked.fill_(123)
    block = FusedBatchRenormAct2d(5, dropout=dropout)
    block.load_state_dict(src.state_dict())  # strict
    for key, value in src.state_dict().items():
        assert torch.equal(block.state_dict()[key], value)
    assert set(block.state_dict()) == set(src.state_dict())  # the masks keep no state of their own


def test_eval_output_is_norm_then_activation():
    block = FusedBatchRenormAct2d(3, dropout=0.5, negative_slope=0.2, backend="reference").eval()
    x = _x(2, 3, 4, 5)
    want = F.leaky_relu(batch_renorm_reference(x, block.running_mean.clone(), block.running_std.clone(),
                                               block.num_batches_tracked.clone(), block.weight, block.bias,
                                               training=False), 0.2)
    state = torch.get_rng_state()
    assert torch.equal(block(x), want)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_come_from_torchs_generator(backend):
    # each training call draws (seed, offset) with torch.randint on the input's device, as
    # nn.Dropout draws its mask from that generator: the mask is the stream's for that draw
    device = require(backend)
    block = FusedBatchRenormAct2d(3, dropout=0.3, activation="identity", backend=backend).to(device)
    with torch.no_grad():
        block.bias.fill_(10.0)  # kept values far from 0
    x = torch.rand(2, 3, 5, 7, device=device) + 1
    torch.manual_seed(5)
    masks = [block(x) != 0 for _ in range(2)]
    torch.manual_seed(5)
    for mask in masks:
        seed, offset = torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64, device=device).tolist()
        want = dropout_keep_mask(tuple(x.shape), 0.3, seed=seed, offset=offset, device=device)
        assert torch.equal(mask, want)
    assert not torch.equal(masks[0], masks[1])  # two calls, two masks


def test_masks_are_reproducible_under_torch_manual_seed():
    x = torch.rand(4, 4, 6, 6) + 1
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        a, b = FusedBatchRenormAct2d(4, dropout=0.2), FusedBatchRenormAct2d(4, dropout=0.2)
        runs.append([a(x) == 0, b(x) == 0])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])  # two layers: two masks


def test_no_dropout_draws_nothing():
    block, x = FusedBatchRenormAct2d(4), _x(2, 4, 3, 3)
    state = torch.get_rng_state()
    block(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_argument_is_retired_with_a_warning():
    with pytest.warns(FutureWarning, match="seed=.* is ignored"):
        FusedBatchRenormAct2d(3, dropout=0.1, seed=5)


@pytest.mark.parametrize("module,shape", [(FusedBatchRenormAct1d, (6, 4)), (FusedBatchRenormAct1d, (3, 4, 5)),
                                          (FusedBatchRenormAct3d, (2, 4, 3, 3, 2))])
def test_other_ranks(module, shape):
    block = module(4, dropout=0.25)
    x = _x(*shape)
    y = block(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert 0 < (y == 0).double().mean().item() < 0.7


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(activation="gelu"), ValueError, "activation must be one of .* got 'gelu'"),
    (dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\), got 1.0"),
    (dict(negative_slope=math.nan), ValueError, "negative_slope must be a finite number, got nan"),
])
def test_bad_constructor_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FusedBatchRenormAct2d(3, **kwargs)


def test_bad_calls_leave_buffers_untouched():
    x = _x(2, 3, 4, 4)
    bufs = [torch.zeros(3), torch.ones(3), torch.tensor(5)]
    before = [b.clone() for b in bufs]
    cases = [
        (dict(dropout=0.2), ValueError, "needs rng"),
        (dict(dropout=0.2, rng=torch.tensor([1, 2], dtype=torch.int32)), ValueError, "int64 .* got torch.int32"),
        (dict(dropout=0.2, rng=torch.tensor([1, 2, 3])), ValueError, r"shape \(2,\), got .* \(3,\)"),
        (dict(dropout=0.2, rng=[1, 2]), TypeError, "got list"),
        (dict(activation="tanh"), ValueError, "got 'tanh'"),
    ]
    for kwargs, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            sk.batch_renorm_act(x, *bufs, **kwargs)
    with pytest.raises(ValueError, match="expected 3 channels"):
        FusedBatchRenormAct2d(3)(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_backward(backend, monkeypatch):
    device = require(backend)
    block = FusedBatchRenormAct2d(3, dropout=0.2, backend=backend).to(device)
    x = _x(4, 3, 5, 5, device=device)
    forbid_host_sync(monkeypatch)
    block(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_one_graph_same_results(backend):
    require(backend)
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1),
                                FusedBatchRenormAct2d(4, dropout=0.3, backend=backend))
    compiled_model = __import__("copy").deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(3, 2, 6, 6)
        torch.manual_seed(step)  # both draw their masks from the same generator state
        y_eager = eager(x)
        torch.manual_seed(step)
        y_comp = compiled(x)
        assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5, name=f"y step {step}")
        y_eager.square().mean().backward()
        y_comp.square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, name=name)
    for a, b in zip(eager[1].buffers(), compiled_model[1].buffers()):
        assert torch.equal(a, b)


def test_opcheck_cpu_block_ops():
    require("cpu")
    ops = torch.ops.speckle_kernels
    for training in (True, False):
        x = torch.randn(3, 4, 5, 6) + 1
        w, b = torch.randn(4), torch.randn(4)
        bufs = [torch.randn(4) * 0.1, torch.rand(4) + 0.5, torch.tensor(7)]
        rng = torch.tensor([5, 3])
        sched = [2 / 35000, 25 / 35, 1.0, 3.0], [5 / 20000, -25 / 20, 0.0, 5.0]
        args = (x, w, b, *bufs, training, 0.01, 1e-3, *sched)
        torch.library.opcheck(ops.batch_renorm_act_forward, args + (2, 0.1, 0.2, rng),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.batch_renorm_stats, args, test_utils=("test_schema", "test_faketensor"))
        _, stats = ops.batch_renorm_act_forward(*args, 2, 0.1, 0.2, rng)
        torch.library.opcheck(ops.batch_renorm_act_backward,
                              (torch.randn_like(x), x, w, stats, training, 2, 0.1, 0.2, rng))
