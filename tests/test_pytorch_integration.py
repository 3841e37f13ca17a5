"""FusedBatchRenorm with the rest of PyTorch: torch.compile, torch.library, autocast,
torch.distributed (gloo, two processes) and the model converters."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import speckle_kernels as sk
from speckle_kernels.batch_renorm_triton import (batch_renorm_triton_backward, batch_renorm_triton_normalize,
                                          batch_renorm_triton_statistics)
from speckle_kernels.sync_batch_renorm import (SyncFusedBatchRenorm, convert_batchrenorm,
                                               convert_sync_batchrenorm)

from .helpers import assert_close
from .third_party_batchrenorm import ThirdPartyBatchRenorm

pytest.importorskip("triton")
from speckle_models.networks.unet import br_unet  # noqa: E402

SCHEDULE = [sk.RMAX_SCHEDULE.slope, sk.RMAX_SCHEDULE.start, sk.RMAX_SCHEDULE.low, sk.RMAX_SCHEDULE.high,
            sk.DMAX_SCHEDULE.slope, sk.DMAX_SCHEDULE.start, sk.DMAX_SCHEDULE.low, sk.DMAX_SCHEDULE.high]


def _small_br_unet(backend: str) -> nn.Module:
    return br_unet(base_channels=4, dropout=0.0, norm_backend=backend)


def _needs_backend(backend):
    from speckle_kernels import _ext
    if backend == "cpu" and not _ext.HAS_CPU_EXT:
        pytest.skip("the C++ CPU extension is not built")


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
def test_compile_fullgraph_no_graph_break_and_same_results(backend):
    _needs_backend(backend)
    eager = _small_br_unet(backend)
    compiled_model = copy.deepcopy(eager)
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    compiled = torch.compile(compiled_model, fullgraph=True, backend=counting_aot_eager)
    for step in range(2):
        x = torch.randn(2, 1, 16, 16)
        y_eager, y_comp = eager(x), compiled(x)
        assert_close(y_comp, y_eager, atol=1e-5 * y_eager.abs().max().item(), rtol=1e-5, name=f"y step {step}")
        y_eager.square().mean().backward()
        y_comp.square().mean().backward()
    assert len(graphs) == 1, f"expected one graph, dynamo made {len(graphs)}"
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert_close(q.grad, p.grad, atol=1e-4 * (p.grad.abs().max().item() + 1e-12), rtol=1e-4, name=name)
    for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
        assert_close(c, b, atol=1e-6, rtol=1e-5, name=name)


def test_opcheck_every_op():
    c = 3
    x = torch.randn(4, c, 5, 5) * 2 + 1
    w, b = torch.randn(c), torch.randn(c)
    bufs = (torch.randn(c), torch.rand(c) + 0.5, torch.tensor(500))
    for training in (True, False):
        args = (x, w, b, *[t.clone() for t in bufs], training, 0.01, 1e-3, SCHEDULE)
        torch.library.opcheck(batch_renorm_triton_statistics, args)
        stats = batch_renorm_triton_statistics(*args)
        torch.library.opcheck(batch_renorm_triton_normalize,
                              (x.clone().requires_grad_(), w.clone().requires_grad_(),
                               b.clone().requires_grad_(), stats, training))
        torch.library.opcheck(batch_renorm_triton_backward, (torch.randn_like(x), x, w, stats, training))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_path_equals_the_registered_ops(training):
    # Eager calls skip torch.library's dispatch (batch_renorm.py, _EagerNormalize); compiled
    # code calls the ops. Same kernels, so the results must agree bit for bit.
    c = 5
    x = (torch.randn(3, c, 7, 4) * 3 + 2).to(memory_format=torch.channels_last)
    w, b = torch.randn(c), torch.randn(c)
    bufs = (torch.randn(c), torch.rand(c) + 0.5, torch.tensor(7000))
    dy = torch.randn_like(x)

    bufs_e = [t.clone() for t in bufs]
    xe, we, be = (t.clone().requires_grad_() for t in (x, w, b))
    ye = sk.batch_renorm(xe, *bufs_e, we, be, training=training, backend="triton")
    ge = torch.autograd.grad(ye, (xe, we, be), dy)

    bufs_o = [t.clone() for t in bufs]
    xo, wo, bo = (t.clone().requires_grad_() for t in (x, w, b))
    stats = batch_renorm_triton_statistics(xo.detach(), wo.detach(), bo.detach(), *bufs_o, training,
                                           0.01, 1e-3, SCHEDULE)
    yo = batch_renorm_triton_normalize(xo, wo, bo, stats, training)
    go = torch.autograd.grad(yo, (xo, wo, bo), dy)

    assert torch.equal(ye, yo)
    for a, o in zip(ge, go):
        assert torch.equal(a, o)
    for a, o in zip(bufs_e, bufs_o):
        assert torch.equal(a, o)


def test_opcheck_cpu_extension_ops():
    _needs_backend("cpu")
    ops = torch.ops.speckle_kernels
    c = 3
    x = torch.randn(4, c, 5, 5) * 2 + 1
    w, b = torch.randn(c), torch.randn(c)
    for training in (True, False):
        bufs = (torch.randn(c), torch.rand(c) + 0.5, torch.tensor(500))
        args = (x, w, b, *bufs, training, 0.01, 1e-3, SCHEDULE[:4], SCHEDULE[4:])
        torch.library.opcheck(ops.batch_renorm_forward, args, test_utils=("test_schema", "test_faketensor"))
        _, stats = ops.batch_renorm_forward(*args)
        torch.library.opcheck(ops.batch_renorm_backward, (torch.randn_like(x), x, w, stats, training))
    u8 = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    torch.library.opcheck(ops.make_noisy_batch, (u8, 1, 0, 5.0, 0.1, 0.1, 0.02, False, True, torch.float32))
    torch.library.opcheck(ops.add_speckle_noise, (torch.rand(2, 3, 4), 1, 0, 5.0, 0.1, 0.7, 0.02, True, True))


@pytest.mark.parametrize("backend", ["triton", "reference", "cpu"])
def test_autocast_bf16_keeps_fp32_statistics(backend):
    _needs_backend(backend)
    layer = sk.FusedBatchRenorm2d(4, backend=backend)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8) * 3 + 100  # a large mean: bf16 statistics would lose it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = layer(h)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert layer.running_mean.dtype == torch.float32
    expected_mean = 0.99 * 0 + 0.01 * h.float().mean((0, 2, 3))
    assert_close(layer.running_mean, expected_mean, atol=1e-4, rtol=1e-5, name="running_mean")
    y.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_bf16_training_tracks_fp32():
    # 200 Adamax steps of a small Br-U-Net on a fixed denoising task, fp32 vs bf16 autocast.
    torch.manual_seed(0)
    clean = torch.rand(4, 1, 16, 16)
    noisy = clean + 0.2 * torch.randn_like(clean)
    losses = {}
    init = br_unet(base_channels=2, dropout=0.0)
    for mode in ("fp32", "bf16"):
        model = copy.deepcopy(init)
        opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
        history = []
        for _ in range(200):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = nn.functional.mse_loss(model(noisy).float(), clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses[mode] = torch.tensor(history)
    assert torch.isfinite(losses["bf16"]).all()
    first, last = losses["fp32"][:10].mean(), losses["fp32"][-20:].mean()
    assert last < 0.5 * first, f"fp32 run did not learn: {first:.4f} -> {last:.4f}"
    bf16_last = losses["bf16"][-20:].mean()
    # bf16 rounding (2^-8 relative per op) perturbs the trajectory, not the outcome: the
    # final loss must sit within 25% of the fp32 run's.
    assert abs(bf16_last - last) <= 0.25 * last, f"bf16 {bf16_last:.5f} vs fp32 {last:.5f}"


def _sync_worker(rank: int, world: int, init_file: str, x_full, dy_full, state, out_dir):
    # Results go through files: tensors sent through a queue are shared by file descriptor and
    # vanish when the worker exits before the parent reads them.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = SyncFusedBatchRenorm(x_full.shape[2])
        layer.load_state_dict(state)
        n = x_full.shape[1] // world  # x_full: (steps, batch, C, H, W)
        results = []
        for step in range(3):
            x = x_full[step][rank * n:(rank + 1) * n].clone().requires_grad_()
            y = layer(x)
            y.backward(dy_full[step][rank * n:(rank + 1) * n])
            results.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
            layer.weight.grad = None
            layer.bias.grad = None
        torch.save((results, dict(layer.state_dict())), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    world, c = 2, 3
    xs = torch.randn(3, 6, c, 5, 4) * 3 + 2
    dys = torch.randn(3, 6, c, 5, 4)
    single = sk.FusedBatchRenorm2d(c, backend="reference")
    with torch.no_grad():
        single.weight.normal_()
        single.bias.normal_()
        single.running_std.fill_(0.7)
        single.num_batches_tracked.fill_(12000)
    state = {k: v.clone() for k, v in single.state_dict().items()}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sync_worker, args=(r, world, str(tmp_path / "pg"), xs, dys, state, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"a gloo worker failed (exit code {p.exitcode}); its traceback is above"
    by_rank = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)}
    for step in range(3):
        x = xs[step].clone().requires_grad_()
        y = single(x)
        y.backward(dys[step])
        y_sync = torch.cat([by_rank[r][0][step][0] for r in range(world)])
        dx_sync = torch.cat([by_rank[r][0][step][1] for r in range(world)])
        assert_close(y_sync, y, atol=1e-5 * y.abs().max().item(), rtol=1e-5, name=f"y step {step}")
        assert_close(dx_sync, x.grad, atol=1e-5 * x.grad.abs().max().item(), rtol=1e-5, name=f"dx step {step}")
        # DDP averages parameter gradients; the sum over ranks is the whole batch's gradient
        dw = sum(by_rank[r][0][step][2] for r in range(world))
        db = sum(by_rank[r][0][step][3] for r in range(world))
        assert_close(dw, single.weight.grad, atol=1e-5 * single.weight.grad.abs().max().item(), rtol=1e-5, name="dw")
        assert_close(db, single.bias.grad, atol=1e-5 * single.bias.grad.abs().max().item(), rtol=1e-5, name="db")
        single.weight.grad = None
        single.bias.grad = None
    for r in range(world):
        for key, value in single.state_dict().items():
            assert_close(by_rank[r][1][key], value, atol=1e-6, rtol=1e-5, name=f"rank {r} {key}")


def test_convert_batchrenorm_swaps_third_party_and_batchnorm():
    class BatchRenorm2d(ThirdPartyBatchRenorm):  # the third-party class name
        pass

    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchRenorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].running_std.uniform_(0.5, 1.5)
        model[1].num_batches_tracked.fill_(100)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    converted = convert_batchrenorm(copy.deepcopy(model))
    assert isinstance(converted[1], sk.FusedBatchRenorm2d)
    assert isinstance(converted[3], nn.BatchNorm2d)
    assert_close(converted(x), before, atol=1e-5, rtol=1e-5, name="converted output")
    both = convert_batchrenorm(copy.deepcopy(model), batchnorm=True)
    assert isinstance(both[3], sk.FusedBatchRenorm2d)
    assert_close(both[3].running_std, (model[3].running_var + model[3].eps).sqrt(), atol=0, rtol=0, name="std")
    synced = convert_sync_batchrenorm(converted)
    assert isinstance(synced[1], SyncFusedBatchRenorm)
    assert int(synced[1].num_batches_tracked) == 100
    # without a process group the sync layer is the plain one
    synced.train()
    plain = copy.deepcopy(converted).train()
    assert_close(synced(x), plain(x), atol=1e-6, rtol=1e-5, name="unsynchronized sync layer")
