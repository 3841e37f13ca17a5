"""What only the C++ CPU BatchRenorm kernel (csrc/cpu) has: its two schedules, its thread
count independence, the op's own argument checks and schemas, and how it is built.

Its accuracy is judged with every other backend's by tests/test_batch_renorm.py (the kit of
speckle_kernels/testing/batch_renorm.py); here the kit runs once more under each forced schedule.
"""
from __future__ import annotations

import pytest
import torch

import speckle_kernels as sk
from speckle_kernels import _backend
from speckle_kernels import _ext, batch_renorm_ext
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

from speckle_kernels.testing import batch_renorm as kit

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")



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


SCHEDULE_CASES = [kit.Case((4, 3, 5, 7)), kit.Case((1, 1, 1, 1)), kit.Case((2, 3, 130, 131), t=60000),
                  kit.Case((3, 70, 2, 3), t=0), kit.Case((4, 3, 5, 7), dtype=torch.bfloat16),
                  kit.Case((8, 3, 6, 6), mean=1e4, std=1e-2)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: c.id)
def test_each_schedule_against_float64(monkeypatch, schedule, case):
    monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", schedule)
    verdict = kit.judge("cpu", kit.draw(case, seed=len(case.id)))
    assert not verdict.failures, verdict.report()


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", "fastest")
    state = _state(3, 0)
    before = [s.clone() for s in state]
    with pytest.raises(ValueError, match="SPECKLE_CPU_RENORM_SCHEDULE.*'fastest'"):
        sk.batch_renorm(torch.randn(2, 3, 4, 4), *state, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "buffers changed"


def test_auto_picks_the_cpu_extension(monkeypatch):
    assert _backend.choose_backend("auto", torch.device("cpu"), has_cpu_ext=True) == "cpu"
    calls = []
    real = batch_renorm_ext.batch_renorm
    monkeypatch.setattr(batch_renorm_ext, "batch_renorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    sk.batch_renorm(torch.randn(2, 3, 4, 4), *_state(3, 0))
    assert calls == [1]


def test_auto_order_on_cuda(monkeypatch):
    # The rule alone (no GPU needed): the built CUDA extension first, then Triton, then the reference.
    cuda = torch.device("cuda")
    assert _backend.choose_backend("auto", cuda, has_cuda_ext=True) == "cuda"
    monkeypatch.setattr(_backend, "triton_usable", lambda device: True)
    assert _backend.choose_backend("auto", cuda, has_cuda_ext=False) == "triton"
    monkeypatch.setattr(_backend, "triton_usable", lambda device: False)
    assert _backend.choose_backend("auto", cuda, has_cuda_ext=False) == "reference"


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
