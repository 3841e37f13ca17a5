"""The norm layers under activation checkpointing (speckle_kernels/checkpoint_replay.py).

A checkpointed call must give what a plain call gives: y, dx, dweight, dbias, the running
statistics and the counter, with and without dropout, in both checkpoint modes, on every backend
present. The recompute runs the forward's very op on the same input bits with the forward's
buffer values and mask, so the two runs agree bit for bit (every backend's kernels are
deterministic: no atomics, fixed reduction orders); the tests ask for that.

The layers start from a late step (t = 20000: r_max = 2.3, d_max = 3.75, so r and d are not
clamped to 1 and 0) with running statistics far from the batch's, so a recompute that read the
buffers after their update would move dx by percents (6 % on 2026-12-03), and a second update
would show in the buffers.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct2d, SyncFusedBatchRenorm
from speckle_kernels.sync_batch_renorm import SyncFusedBatchRenormAct
from speckle_kernels.testing.backends import BACKENDS, require

MODES = {"non-reentrant": False, "reentrant": True}


@pytest.fixture(autouse=True)
def deterministic_convolutions():
    # On a GPU cuDNN may pick convolution algorithms that sum in another order each call: the
    # runs compared here must differ only by what checkpointing changes.
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
LAYERS = {
    "renorm": lambda backend: FusedBatchRenorm2d(5, backend=backend),
    "block": lambda backend: FusedBatchRenormAct2d(5, backend=backend),
    "block-dropout": lambda backend: FusedBatchRenormAct2d(5, dropout=0.3, backend=backend),
    "sync": lambda backend: SyncFusedBatchRenorm(5, backend=backend),
    "sync-block": lambda backend: SyncFusedBatchRenormAct(5, backend=backend),
}


def _late_layer(kind: str, backend: str, device) -> nn.Module:
    layer = LAYERS[kind](backend).to(device).train()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_(0.0, 2.0)
        layer.running_std.uniform_(0.5, 2.0)
        layer.num_batches_tracked.fill_(20000)
    return layer


def _run(layer: nn.Module, xs, dys, *, mode: str | None, seed: int = 7) -> dict:
    """Calls (training steps) of `layer` on each x, backward with each dy; plain or checkpointed."""
    torch.manual_seed(seed)  # the dropout masks of both runs come from the same generator state
    out = {"y": [], "dx": [], "dweight": [], "dbias": []}
    for x, dy in zip(xs, dys):
        x = x.clone().requires_grad_()
        y = layer(x) if mode is None else checkpoint(layer, x, use_reentrant=MODES[mode])
        y.backward(dy)
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dweight"].append(layer.weight.grad.clone())
        out["dbias"].append(layer.bias.grad.clone())
        layer.weight.grad = layer.bias.grad = None
    out["buffers"] = [b.clone() for b in layer.buffers()]
    return out


def _assert_same(got: dict, want: dict, what: str) -> None:
    for name, values in want.items():
        for step, (a, b) in enumerate(zip(got[name], values)):
            assert torch.equal(a, b), (f"{what}: {name} (step or buffer {step}) differs from the plain "
                                       f"call's by {(a.double() - b.double()).abs().max().item():.3g}")


def _data(device, steps=2, shape=(4, 5, 6, 7)):
    xs = [(torch.randn(shape) * 3 + 1).to(device) for _ in range(steps)]
    return xs, [torch.randn(shape).to(device) for _ in range(steps)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointed_call_equals_plain_call(backend, kind, mode):
    device = require(backend)
    layer = _late_layer(kind, backend, device)
    xs, dys = _data(device)
    want = _run(copy.deepcopy(layer), xs, dys, mode=None)
    got = _run(copy.deepcopy(layer), xs, dys, mode=mode)
    _assert_same(got, want, f"{kind} on {backend}, {mode} checkpoint")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_layer_and_second_backward_replay_in_order(backend):
    # one layer called twice in a step, each call its own checkpoint, the backward taken twice
    # (retain_graph): the k-th recompute of a pass replays the k-th latest forward
    device = require(backend)
    layer = _late_layer("block-dropout", backend, device)
    conv = nn.Conv2d(5, 5, 3, padding=1).to(device)
    x, dy = (t[0] for t in _data(device, steps=1))

    def step(model, checkpointed: bool):
        torch.manual_seed(3)
        xr = x.clone().requires_grad_()
        call = functools.partial(checkpoint, model, use_reentrant=False) if checkpointed else model
        y = call(conv(call(xr)))
        y.backward(dy, retain_graph=True)
        y.backward(dy)
        return [y.detach(), xr.grad, model.weight.grad, *model.buffers()]

    want = step(copy.deepcopy(layer), False)
    for name, a, b in zip(("y", "dx", "dweight", "running_mean", "running_std", "t"),
                          step(copy.deepcopy(layer), True), want):
        assert torch.equal(a, b), f"{name} differs from the plain run's"


@pytest.mark.parametrize("mode", MODES)
def test_synchronized_path_replays(mode, monkeypatch, tmp_path):
    # the all_gather path of SyncFusedBatchRenorm(Act) (torch ops, its own autograd) in a
    # one-rank gloo group, forced to synchronize
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(SyncFusedBatchRenorm, "_synchronizing", lambda self: self.training)
        for kind in ("sync", "sync-block"):
            layer = _late_layer(kind, "reference", "cpu")
            xs, dys = _data("cpu")
            want = _run(copy.deepcopy(layer), xs, dys, mode=None)
            _assert_same(_run(copy.deepcopy(layer), xs, dys, mode=mode), want, f"{kind}, gathered")
    finally:
        dist.destroy_process_group()


def test_plain_calls_record_nothing():
    # a training call outside any checkpoint keeps no snapshot (no cost); eval calls neither
    layer = _late_layer("renorm", "reference", "cpu")
    layer(torch.randn(2, 5, 3, 3, requires_grad=True)).sum().backward()
    layer.eval()(torch.randn(2, 5, 3, 3))
    assert len(layer._replay.snapshots) == 0


def test_old_state_dict_with_dropout_rng_loads():
    # modules saved before the mask moved to torch's generator carry a `dropout_rng` buffer
    src = FusedBatchRenormAct2d(5, dropout=0.2)
    state = dict(src.state_dict(), dropout_rng=torch.tensor([123, 4096]))
    dst = FusedBatchRenormAct2d(5, dropout=0.2)
    dst.load_state_dict(state)  # strict
    assert set(dst.state_dict()) == set(src.state_dict()) and "dropout_rng" not in dst.state_dict()


def _checkpointed_units(model: nn.Module, use_reentrant: bool) -> nn.Module:
    """Every conv unit of the U-Net (Dropout -> Conv -> Norm -> Act [-> Norm]) run through
    torch.utils.checkpoint."""
    for unit in model.modules():
        if type(unit).__name__ == "_ConvUnit":
            unit.forward = functools.partial(checkpoint, type(unit).forward.__get__(unit),
                                             use_reentrant=use_reentrant)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_br_unet_training_step_with_checkpointed_units(backend, mode, one_thread):
    # two Adamax steps of a small Br-U-Net (its nn.Dropout layers included: checkpoint replays
    # their masks too) with every conv unit checkpointed, against the same network without
    device = require(backend)
    from speckle_models.networks.unet import br_unet

    torch.manual_seed(0)
    plain = br_unet(base_channels=4, norm_backend=backend).to(device)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, FusedBatchRenorm2d):
                m.num_batches_tracked.fill_(20000)
                m.running_std.uniform_(0.5, 2.0)
    ckpt = _checkpointed_units(copy.deepcopy(plain), MODES[mode])
    clean = torch.rand(2, 1, 16, 16, device=device)
    # an input that needs grad: the reentrant checkpoint gives no parameter gradients otherwise
    noisy = (clean + 0.2 * torch.randn_like(clean)).requires_grad_()
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(11)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(2):
            loss = nn.functional.mse_loss(model(noisy), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((losses, [p.grad for p in model.parameters()], list(model.state_dict().values())))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b)), (loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b)), "a parameter gradient differs"
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b)), "a weight or buffer differs"


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_compiled_checkpointed_region_with_the_policy(backend, one_thread):
    # torch.compile recomputes a checkpointed region's ops itself; with checkpoint_context
    # (the statistics ops' outputs saved) the compiled region equals the plain eager one
    import speckle_kernels as sk

    device = require(backend)
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), _late_layer("block-dropout", backend, device),
                         nn.Conv2d(5, 5, 3, padding=1), _late_layer("renorm", backend, device)).to(device)

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.unit = copy.deepcopy(unit)

        def forward(self, x):
            return checkpoint(self.unit, x, use_reentrant=False, context_fn=sk.checkpoint_context)

    compiled_model = Checkpointed()
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, dy = (t[0] for t in _data(device, steps=1, shape=(4, 3, 6, 6)))
    dy = dy[:, :1].expand(4, 5, 6, 6).contiguous()
    runs = []
    for model, params in ((unit, unit), (compiled, compiled_model.unit)):
        torch.manual_seed(1)
        xr = x.clone().requires_grad_()
        y = model(xr)
        y.backward(dy)
        runs.append([y.detach(), xr.grad] + [p.grad for p in params.parameters()] + list(params.buffers()))
    for k, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"item {k} (y, dx, gradients, buffers) differs"
