"""FusedBatchRenorm on every backend (reference, cpu, triton, cuda), judged by one kit.

Accuracy: speckle_kernels/testing/batch_renorm.py runs each case (odd shapes, N*H*W = 1, 2, 3, C = 1, big
mean and small spread, fp32/fp16/bf16, contiguous and channels_last, t = 0/20000/60000, several
training steps then eval) and holds every backend's error against float64 to at most twice the
fp32 reference's plus one ulp. The rest: the third-party layer's own expectation, exact zeros
where the true gradient is zero, random cases drawn by hypothesis, and the module's contract
(drop-in state_dicts, bad input, no host synchronization).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import speckle_kernels as sk
from speckle_kernels import FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d
from speckle_kernels.reference import batch_renorm_reference
from speckle_kernels.schedules import RenormSchedule

from speckle_kernels.testing import batch_renorm as kit
from speckle_kernels.testing.backends import BACKENDS, require
from .helpers import assert_close, forbid_host_sync
from .third_party_batchrenorm import ThirdPartyBatchRenorm

DRAWS = 3


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("case", kit.CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_case_against_float64(backend, case):
    device = require(backend)
    for k in range(DRAWS):
        d = kit.draw(case, _seed(case.id, k), device)
        verdict = kit.judge(backend, d)
        assert not verdict.failures, verdict.report() + "\n" + "\n".join(verdict.failures)


def test_headline_shape_on_the_cpu_backend():
    # Br-U-Net's (32, 64, 128, 128) at full size, once: the CPU kernel's per-channel schedule
    # and its long reductions only show up at this size.
    require("cpu")
    d = kit.draw(kit.HEADLINE, _seed("headline"))
    verdict = kit.judge("cpu", d)
    assert not verdict.failures, verdict.report()


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_party_expectation_over_1000_draws(backend):
    # The third-party package's own test: BatchRenorm1d(10, eps=0) on x = randn(100, 10) equals
    # F.batch_norm in training to 1e-5 (at t = 0: r_max = 1, d_max = 0, so it is batch norm).
    # torch >= 2.x refuses eps = 0 in F.batch_norm; 1e-12 on the float64 copy is plain batch
    # norm to far below the 1e-5 asked.
    device = require(backend)
    g = torch.Generator(device=device).manual_seed(_seed("third-party", backend))
    worst = 0.0
    for _ in range(1000):
        x = torch.randn(100, 10, generator=g, device=device)
        rm, rs = torch.zeros(10, device=device), torch.ones(10, device=device)
        y = sk.batch_renorm(x, rm, rs, torch.tensor(0, device=device), eps=0.0, backend=backend)
        expected = F.batch_norm(x.double(), None, None, training=True, eps=1e-12)
        worst = max(worst, (y.double() - expected).abs().max().item())
    assert worst < 1e-5, f"worst |y - F.batch_norm| over 1000 draws: {worst:.3g}"


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (1, 3), (1, 4, 1), (1, 2, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dx_is_exactly_zero_with_one_value_per_channel(backend, shape):
    # y = weight*d + bias does not depend on x there; every backend must say so exactly.
    device = require(backend)
    for dtype in (torch.float32, torch.bfloat16):
        c = shape[1]
        x = (torch.randn(shape, device=device) * 5 + 3).to(dtype).requires_grad_()
        rm, rs = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        w = torch.randn(c, device=device, requires_grad=True)
        b = torch.randn(c, device=device, requires_grad=True)
        y = sk.batch_renorm(x, rm, rs, torch.tensor(30000, device=device), w, b, backend=backend)
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert torch.count_nonzero(dx) == 0, f"dx = {dx.flatten().tolist()}"


def _hypothesis_backends():
    backends = ["reference", "cpu"]
    if torch.cuda.is_available():
        backends.append("triton")
    return backends


@st.composite
def _random_case(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    big = draw(st.booleans())
    return kit.Case(shape, dtype=dtype, channels_last=ndim in (4, 5) and draw(st.booleans()),
                    mean=1e4 if big and dtype == torch.float32 else 0.0, std=1e-2 if big else 1.0,
                    t=draw(st.sampled_from([0, 5000, 20000, 60000])), affine=draw(st.booleans()),
                    momentum=draw(st.sampled_from([0.0, 0.01, 0.3, 1.0])), train_steps=2)


# Bounded so the whole property test stays within a minute in CI.
@settings(max_examples=int(os.environ.get("SPECKLE_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_random_case(), seed=st.integers(0, 2**31 - 1))
def test_random_cases_against_float64(case, seed):
    for backend in _hypothesis_backends():
        d = kit.draw(case, seed, "cuda" if backend == "triton" else "cpu")
        verdict = kit.judge(backend, d)
        assert not verdict.failures, verdict.report() + "\n" + "\n".join(verdict.failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_grad_in_another_layout(backend):
    device = require(backend)
    x = torch.randn(4, 6, 5, 7, device=device)[:, ::2]  # neither contiguous nor channels_last
    state = [torch.randn(3, device=device), torch.rand(3, device=device) + 0.5, torch.tensor(5, device=device)]
    yr = batch_renorm_reference(x, *[s.clone() for s in state])
    assert_close(sk.batch_renorm(x, *state, backend=backend), yr, atol=1e-5 * yr.abs().max().item(),
                 rtol=1e-5, name="strided y")
    x = torch.randn(3, 4, 5, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 4, 5, 6, device=device)  # contiguous while x is channels_last
    state = [torch.randn(4, device=device), torch.rand(4, device=device) + 0.5, torch.tensor(300, device=device)]
    batch_renorm_reference(xr, *[s.clone() for s in state]).backward(dy)
    sk.batch_renorm(x, *state, backend=backend).backward(dy)
    assert_close(x.grad, xr.grad, atol=1e-5 * xr.grad.abs().max().item(), rtol=1e-5, name="dx")


def test_reference_gradcheck_float64():
    # r and d carry no gradient by definition, so finite differences agree with autograd only
    # where they are locally constant: t=0 (r_max=1, d_max=0: plain batch norm) or running
    # statistics far enough off that both clip (running_mean=10, running_std=0.01).
    for shape, t, rm, rs in (((3, 2, 4, 3), 0, 0.0, 0.8), ((3, 2, 4, 3), 30000, 10.0, 0.01),
                             ((1, 2, 1, 1), 10, 0.0, 0.8), ((4, 3), 0, 0.0, 1.0)):
        c = shape[1]
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(c, dtype=torch.float64, requires_grad=True)
        b = torch.randn(c, dtype=torch.float64, requires_grad=True)

        def fn(x, w, b):
            bufs = (torch.full((c,), rm, dtype=torch.float64), torch.full((c,), rs, dtype=torch.float64),
                    torch.tensor(t))
            return batch_renorm_reference(x, *bufs, w, b, training=True)

        assert torch.autograd.gradcheck(fn, (x, w, b))
        grads = torch.autograd.grad(fn(x, w, b).sum(), (x, w, b))
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_schedules(backend):
    device = require(backend)
    x = torch.randn(6, 3, 4, 4, device=device) * 4 + 2
    for r_max, d_max in ((1.5, 0.5), (RenormSchedule(1e-3, 1.0, 1.0, 2.0), RenormSchedule(1e-3, 0.0, 0.0, 1.0))):
        mk = FusedBatchRenorm2d(3, r_max=r_max, d_max=d_max, backend=backend).to(device)
        mr = FusedBatchRenorm2d(3, r_max=r_max, d_max=d_max, backend="reference").to(device)
        for m in (mk, mr):
            m.running_std.fill_(0.5)
            m.num_batches_tracked.fill_(200)
        assert_close(mk(x), mr(x), atol=1e-5 * 10, rtol=1e-5, name=f"y with r_max={r_max}")
    with pytest.raises(TypeError, match="r_max"):
        FusedBatchRenorm2d(3, r_max="big")


@pytest.mark.parametrize("module_cls,shape,affine", [
    (FusedBatchRenorm1d, (8, 5), True), (FusedBatchRenorm1d, (4, 5, 6), False),
    (FusedBatchRenorm2d, (4, 5, 6, 3), True), (FusedBatchRenorm3d, (2, 5, 3, 4, 2), True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_for_third_party_layer(backend, module_cls, shape, affine):
    device = require(backend)
    third = ThirdPartyBatchRenorm(shape[1], affine=affine).to(device)
    with torch.no_grad():  # a trained-looking state
        third.weight.normal_()
        third.bias.normal_()
        third.running_mean.normal_()
        third.running_std.uniform_(0.5, 2.0)
        third.num_batches_tracked.fill_(15000)
    fused = module_cls(shape[1], affine=affine, backend=backend).to(device)
    fused.load_state_dict(third.state_dict())
    for step in range(3):
        x = torch.randn(shape, device=device) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = third(x1), fused(x2)
        assert_close(y2, y1, atol=1e-5 * y1.abs().max().item(), rtol=1e-5, name=f"y step {step}")
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        assert_close(x2.grad, x1.grad, atol=1e-5 * x1.grad.abs().max().item(), rtol=1e-5, name="dx")
        if affine:
            for p1, p2 in ((third.weight, fused.weight), (third.bias, fused.bias)):
                assert_close(p2.grad, p1.grad, atol=1e-5 * p1.grad.abs().max().item(), rtol=1e-5, name="dparam")
    fused_state, third_state = fused.state_dict(), third.state_dict()
    for key, value in fused_state.items():
        assert_close(value, third_state[key], atol=1e-6, rtol=1e-5, name=key)
    third.load_state_dict(fused.state_dict(), strict=affine)  # and back
    fused.eval(), third.eval()
    x = torch.randn(shape, device=device)
    assert_close(fused(x), third(x), atol=1e-5 * 10, rtol=1e-5, name="eval y")


def test_state_dict_round_trip(tmp_path):
    m = FusedBatchRenorm2d(4)
    for _ in range(3):
        m(torch.randn(3, 4, 5, 5) * 2 + 1)
    path = tmp_path / "layer.pt"
    torch.save(m.state_dict(), path)
    m2 = FusedBatchRenorm2d(4)
    m2.load_state_dict(torch.load(path, weights_only=True))
    assert sorted(m2.state_dict()) == ["bias", "num_batches_tracked", "running_mean", "running_std", "weight"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert int(m2.num_batches_tracked) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_leave_buffers_untouched(backend):
    device = require(backend)
    m = FusedBatchRenorm2d(3, backend=backend).to(device)
    m(torch.randn(2, 3, 4, 4, device=device) + 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cases = [
        (torch.randn(2, 3, 4, device=device), ValueError, r"expected 4D input \(got 3D input\)"),
        (torch.randn(2, 3, 4, 4, 1, device=device), ValueError, r"expected 4D input \(got 5D input\)"),
        (torch.randn(2, 5, 4, 4, device=device), ValueError, r"expected 3 channels .* got 5"),
        (torch.randint(0, 5, (2, 3, 4, 4), device=device), TypeError, r"floating-point input, got dtype torch.int64"),
        (torch.randn(0, 3, 4, 4, device=device), ValueError, r"non-empty input, got shape \(0, 3, 4, 4\)"),
        ("not a tensor", TypeError, r"torch.Tensor input, got str"),
    ]
    for x, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected input"


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        FusedBatchRenorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        FusedBatchRenorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        FusedBatchRenorm2d(3, backend="gpu")
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        FusedBatchRenorm2d(0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        FusedBatchRenorm2d(3, momentum=2.0)


def test_backend_selection():
    x = torch.randn(2, 3, 4, 4)
    bufs = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        sk.batch_renorm(x, *bufs, backend="cuda")
    with pytest.raises(TypeError, match="supports float32, float16, bfloat16, got torch.float64"):
        sk.batch_renorm(x.double(), *(b.double() if b.is_floating_point() else b for b in bufs), backend="triton")
    # float64 under auto falls back to the reference quietly, and is exact there
    y = sk.batch_renorm(x.double(), *(b.double() if b.is_floating_point() else b.clone() for b in bufs))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_backward(backend, monkeypatch):
    # .item()/bool() on a tensor would synchronize with the device; make them fail loudly.
    device = require(backend)
    m = FusedBatchRenorm2d(3, backend=backend).to(device)
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    forbid_host_sync(monkeypatch)
    m(x).sum().backward()
    assert x.grad is not None
