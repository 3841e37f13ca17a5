"""The C++ CPU BatchRenorm kernel (csrc/cpu) against the plain-PyTorch reference.

Tolerances follow tests/test_batch_renorm.py: fp32 sums in another order differ by a few
n*2^-24 relative (rtol = atol/scale = 1e-5); fp16/bf16 outputs are computed in fp32 by both and
rounded once, so they differ by at most one unit in the last place (2^-10, 2^-7). dx cancels
terms of size |A*dy| (A = w*r/sigma or w/rs), so its absolute tolerance scales with those.
"""
from __future__ import annotations

import pytest
import torch

import speckle_kernels as sk
from speckle_kernels import _backend
from speckle_kernels import _ext, batch_renorm_ext
from speckle_kernels.reference import batch_renorm_reference
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

from .helpers import assert_close

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")

ULP = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ODD_SHAPES = [(4, 3, 5, 7), (5, 1, 7, 3), (1, 6, 1, 1), (7, 2, 13, 1), (2, 5), (3, 4, 9),
              (2, 3, 4, 5, 3), (3, 70, 2, 3), (1, 1, 1, 1), (2, 3, 150, 61)]  # last: 2 chunks a plane


def _input(shape, dtype, channels_last=False, big_mean=False):
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    if big_mean:  # E[x^2]-E[x]^2 in fp32 would return noise here
        x = 1e4 + 1e-2 * torch.randn(shape, dtype=torch.float64)
    else:
        x = torch.randn(shape, dtype=torch.float64) * (3 * torch.rand(view, dtype=torch.float64) + 1.5) \
            + torch.randn(view, dtype=torch.float64)
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _state(c, t):
    return [torch.randn(c) * 0.7, torch.rand(c) * 2 + 0.3, torch.tensor(t, dtype=torch.long)]


def _step(fn, x, state, weight, bias, dy, training, **kw):
    x = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() if p is not None else None for p in (weight, bias)]
    y = fn(x, *state, *params, training=training, **kw)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad if p is not None else None for p in params]


def check_against_reference(shape, dtype=torch.float32, channels_last=False, training=True, t=9000,
                            affine=True, big_mean=False, steps=1):
    """big_mean compares with the fp64 reference: the fp32 one is itself off by ~0.1 there."""
    c = shape[1]
    weight, bias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    state_k = _state(c, t)
    ref_dtype = torch.float64 if big_mean else torch.float32
    state_r = [s.to(ref_dtype, copy=True) if s.is_floating_point() else s.clone() for s in state_k]
    w_r, b_r = ((weight.to(ref_dtype), bias.to(ref_dtype)) if affine else (None, None))
    tol = ULP[dtype]
    for step in range(steps):
        x = _input(shape, dtype, channels_last, big_mean)
        dy = torch.randn(shape).to(dtype)
        yk, dxk, (dwk, dbk) = _step(sk.batch_renorm, x, state_k, weight, bias, dy, training, backend="cpu")
        xr = x.to(ref_dtype) if big_mean else x
        yr, dxr, (dwr, dbr) = _step(batch_renorm_reference, xr, state_r, w_r, b_r, dy.to(xr.dtype), training)
        assert yk.dtype == x.dtype and yk.stride() == x.stride() and dxk.stride() == x.stride()
        assert_close(yk, yr, atol=tol * yr.abs().max().item(), rtol=tol, name=f"y step {step}")
        dims = [0] + list(range(2, x.dim()))
        sigma_min = x.double().std(dims, unbiased=False).min().item() + 1e-3
        w_max = weight.abs().max().item() if affine else 1.0
        a_max = w_max * max(3.0 / sigma_min, 1.0 / state_r[1].min().item(), 1.0 / state_k[1].min().item())
        assert_close(dxk, dxr, atol=tol * a_max * dy.abs().max().item(), rtol=tol, name=f"dx step {step}")
        if affine:  # fp32 sums of the same rounded terms in both: fp32 tolerance on their |sum|
            dyd = dy.double()
            bound_b = 1e-5 * dyd.abs().sum(dims) + 1e-6
            assert ((dbk.double() - dbr.double()).abs() <= bound_b).all(), "dbias"
            xhat = (yr.double() - bias.view([1, c] + [1] * (x.dim() - 2))) / weight.view([1, c] + [1] * (x.dim() - 2))
            bound_w = 1e-5 * ((dyd * xhat).abs().sum(dims) + dyd.abs().sum(dims)) + 1e-6
            assert ((dwk.double() - dwr.double()).abs() <= bound_w).all(), "dweight"
        assert int(state_k[2]) == int(state_r[2])
        for name, a, b in zip(("running_mean", "running_std"), state_k, state_r):
            assert_close(a, b, atol=1e-6 * (b.abs().max().item() + 1), rtol=1e-5, name=name)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp32_matches_reference(shape, training):
    check_against_reference(shape, training=training)


@pytest.mark.parametrize("t", [0, 7000, 60000], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_running_stats_and_clipping_over_steps(t, affine):
    check_against_reference((6, 5, 4, 3), t=t, affine=affine, steps=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (3, 70, 2, 3), (2, 37, 9, 5), (2, 3, 4, 5, 3)], ids=str)
def test_dtypes_and_layouts(dtype, channels_last, shape):
    check_against_reference(shape, dtype, channels_last, steps=2)
    check_against_reference(shape, dtype, channels_last, training=False)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_big_mean_small_spread(channels_last):
    # the C++ kernel's error against fp64 may be at most 2x the fp32 reference's
    x = _input((8, 3, 6, 6), torch.float32, channels_last, big_mean=True)
    outs = {}
    for name, fn, dt, kw in (("cpu", sk.batch_renorm, torch.float32, {"backend": "cpu"}),
                             ("ref32", batch_renorm_reference, torch.float32, {}),
                             ("ref64", batch_renorm_reference, torch.float64, {})):
        state = [torch.zeros(3, dtype=dt), torch.ones(3, dtype=dt), torch.tensor(0)]
        outs[name] = fn(x.to(dt), *state, **kw).double()
    err = (outs["cpu"] - outs["ref64"]).abs().max().item()
    err32 = (outs["ref32"] - outs["ref64"]).abs().max().item()
    assert err <= max(2 * err32, 1e-5), (err, err32)
    assert outs["ref64"].std() > 0.5
    check_against_reference((8, 3, 6, 6), channels_last=channels_last, big_mean=True, steps=2)


def test_strided_input_and_mismatched_grad_layout():
    x = torch.randn(4, 6, 5, 7)[:, ::2]  # neither contiguous nor channels_last: one copy
    state = _state(3, 5)
    yr = batch_renorm_reference(x, *[s.clone() for s in state])
    assert_close(sk.batch_renorm(x, *state, backend="cpu"), yr, atol=1e-5 * yr.abs().max().item(),
                 rtol=1e-5, name="strided y")
    x = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 4, 5, 6)  # contiguous while x is channels_last
    state = _state(4, 300)
    batch_renorm_reference(xr, *[s.clone() for s in state]).backward(dy)
    sk.batch_renorm(x, *state, backend="cpu").backward(dy)
    assert_close(x.grad, xr.grad, atol=1e-5 * xr.grad.abs().max().item(), rtol=1e-5, name="dx")


def test_results_do_not_depend_on_thread_count():
    x = _input((4, 8, 64, 70), torch.float32).requires_grad_()
    dy = torch.randn_like(x)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            state = _state(8, 500)
            y = sk.batch_renorm(x, *state, backend="cpu")
            (dx,) = torch.autograd.grad(y, x, dy)
            results.append((y, dx, state[0], state[1]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


SCHEDULES = ("split", "per-channel")


def _run_schedule(monkeypatch, schedule, x, dy, c, training=True):
    monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", schedule)
    torch.manual_seed(3)
    state = _state(c, 500)
    weight, bias = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
    xg = x.detach().clone().requires_grad_()
    y = sk.batch_renorm(xg, *state, weight, bias, training=training, backend="cpu")
    return (y, *torch.autograd.grad(y, (xg, weight, bias), dy), state[0], state[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 8, 64, 70), (2, 3, 130, 131), (5, 1, 7, 3), (3, 70, 2, 3)], ids=str)
def test_split_and_per_channel_schedules_agree_bit_for_bit(monkeypatch, shape, dtype):
    # Same chunks, fp32 partials and merge order: which schedule runs changes no bit.
    # (2, 3, 130, 131): two chunks a plane, the second short.
    x = _input(shape, dtype)
    dy = torch.randn(shape).to(dtype)
    for training in (True, False):
        split, per_channel = (_run_schedule(monkeypatch, s, x, dy, shape[1], training) for s in SCHEDULES)
        for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_std"),
                              split, per_channel):
            assert torch.equal(a, b), f"{name} differs between schedules (training={training})"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 1, 1, 1), (2, 3, 130, 131), (3, 70, 2, 3)], ids=str)
def test_each_schedule_matches_reference(monkeypatch, schedule, shape):
    monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", schedule)
    check_against_reference(shape, steps=2)
    check_against_reference(shape, torch.bfloat16)
    check_against_reference((8, 3, 6, 6), big_mean=True)


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", "fastest")
    state = _state(3, 0)
    before = [s.clone() for s in state]
    with pytest.raises(ValueError, match="SPECKLE_CPU_RENORM_SCHEDULE.*'fastest'"):
        sk.batch_renorm(torch.randn(2, 3, 4, 4), *state, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "buffers changed"


def test_auto_picks_the_cpu_extension(monkeypatch):
    assert _backend.resolve_backend("auto", torch.device("cpu"), has_cpu_ext=True) == "cpu"
    calls = []
    real = batch_renorm_ext.batch_renorm
    monkeypatch.setattr(batch_renorm_ext, "batch_renorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    sk.batch_renorm(torch.randn(2, 3, 4, 4), *_state(3, 0))
    assert calls == [1]


def test_auto_order_on_cuda(monkeypatch):
    # The rule alone (no GPU needed): the built CUDA extension first, then Triton, then the reference.
    cuda = torch.device("cuda")
    assert _backend.resolve_backend("auto", cuda, has_cuda_ext=True) == "cuda"
    monkeypatch.setattr(_backend, "triton_usable", lambda device: True)
    assert _backend.resolve_backend("auto", cuda, has_cuda_ext=False) == "triton"
    monkeypatch.setattr(_backend, "triton_usable", lambda device: False)
    assert _backend.resolve_backend("auto", cuda, has_cuda_ext=False) == "reference"


def test_module_uses_extension_and_no_host_sync_in_backward(monkeypatch):
    m = sk.FusedBatchRenorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = m(x)
    monkeypatch.setattr(torch.Tensor, "item", lambda *a: (_ for _ in ()).throw(AssertionError("sync")))
    y.sum().backward()
    assert int(m.num_batches_tracked) == 1 and x.grad is not None


def _op_args(x, c):
    return [x, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), torch.tensor(0),
            True, 0.01, 1e-3, [RMAX_SCHEDULE.slope, RMAX_SCHEDULE.start, RMAX_SCHEDULE.low, RMAX_SCHEDULE.high],
            [DMAX_SCHEDULE.slope, DMAX_SCHEDULE.start, DMAX_SCHEDULE.low, DMAX_SCHEDULE.high]]


@pytest.mark.parametrize("index,value,pattern", [
    (0, torch.randint(0, 5, (2, 3, 4)), "expected float32, float16 or bfloat16, got Long"),
    (0, torch.randn(2, 3, 4, dtype=torch.float64), "got Double"),
    (0, torch.randn(3), "at least 2 dims"),
    (0, torch.randn(0, 3, 4), "non-empty"),
    (1, torch.ones(4), r"weight must have shape \(3,\)"),
    (3, torch.zeros(2, 3), r"running_mean must have shape \(3,\)"),
    (4, torch.ones(3, dtype=torch.long), "running_std must be floating point"),
    (5, torch.tensor(0.0), "num_batches_tracked must be one int64 element"),
    (7, 1.5, r"momentum must lie in \[0, 1\]"),
    (8, -1.0, "eps must be >= 0"),
    (9, [1.0, 2.0], r"r_max must be \[slope, start, low, high\]"),
])
def test_bad_inputs_raise_instead_of_crashing(index, value, pattern):
    args = _op_args(torch.randn(2, 3, 4), 3)
    args[index] = value
    before = [a.clone() for a in args[3:6]]
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.speckle_kernels.batch_renorm_forward(*args)
    if index not in (3, 4, 5):
        assert all(torch.equal(a, b) for a, b in zip(args[3:6], before)), "buffers changed"


def test_bad_backward_inputs_raise():
    x = torch.randn(2, 3, 4)
    y, stats = torch.ops.speckle_kernels.batch_renorm_forward(*_op_args(x, 3))
    op = torch.ops.speckle_kernels.batch_renorm_backward
    with pytest.raises(RuntimeError, match="dy has shape"):
        op(torch.randn(2, 3, 5), x, None, stats, True)
    with pytest.raises(RuntimeError, match="stats must be a contiguous float32"):
        op(torch.randn(2, 3, 4), x, None, stats[:5], True)
    with pytest.raises(RuntimeError, match="stats must be a contiguous float32"):
        op(torch.randn(2, 3, 4), x, None, stats.double(), True)
    dx, dw, db = op(torch.randn(2, 3, 4).double(), x, None, stats, True)  # dy is cast to x's dtype
    assert dx.dtype == x.dtype and dw.shape == db.shape == (3,)


def test_op_schemas():
    x = torch.randn(2, 3, 4)
    torch.library.opcheck(torch.ops.speckle_kernels.batch_renorm_forward.default, _op_args(x, 3),
                          test_utils=("test_schema",))
    _, stats = torch.ops.speckle_kernels.batch_renorm_forward(*_op_args(x, 3))
    torch.library.opcheck(torch.ops.speckle_kernels.batch_renorm_backward.default,
                          (torch.randn(2, 3, 4), x, torch.ones(3), stats, True), test_utils=("test_schema",))


def test_built_with_openmp_where_torch_uses_it():
    # at::parallel_for is inline in ATen's headers: built without -fopenmp it runs the whole range
    # on one thread, silently (this happened; setup.py's _openmp_flags is the fix).
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch's intra-op pool is not OpenMP")
    import pathlib
    import speckle_kernels

    libs = sorted(pathlib.Path(speckle_kernels.__file__).parent.glob("_C.*.so"))
    assert libs, "no _C extension file next to speckle_kernels/__init__.py"
    assert b"GOMP_parallel" in libs[0].read_bytes(), f"{libs[0].name} was built without -fopenmp"
