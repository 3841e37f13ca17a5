"""FusedBatchRenorm against its plain-PyTorch reference: outputs, gradients, running statistics.

Tolerances (derived, not tuned):
- fp32: the kernel and the reference compute the same fp32 sums in different orders; for
  n <= 10^3 terms a relative error of a few n*2^-24 ~ 1e-5 bounds the difference, so outputs and
  gradients are compared with rtol = 1e-5 and atol = 1e-5 times the tensor's scale.
- fp16/bf16: both compute in fp32 and round once to the input dtype, so they may differ by one
  unit in the last place: rtol = 2^-10 (fp16) or 2^-7 (bf16), atol = that times the scale.
  Weight/bias gradients stay fp32 sums of the same rounded inputs: fp32 tolerances.
"""
from __future__ import annotations

import pytest
import torch

import speckle_kernels as sk
from speckle_kernels import FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d
from speckle_kernels.reference import batch_renorm_reference
from speckle_kernels.schedules import RenormSchedule

from .helpers import assert_close
from .third_party_batchrenorm import ThirdPartyBatchRenorm

triton = pytest.importorskip("triton")

ULP = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SHAPES = [
    (4, 3, 5, 7),      # odd sizes
    (5, 1, 7, 3),      # one channel
    (1, 6, 1, 1),      # N*H*W = 1: zero variance
    (7, 2, 13, 1),     # a size-1 spatial dim
    (2, 5),            # 1d (N, C)
    (3, 4, 9),         # 1d (N, C, L)
    (2, 3, 4, 5, 3),   # 3d
    (3, 70, 2, 3),     # more channels than one channel block of the channels_last path
]


def _make(shape, dtype, channels_last=False, big_mean=False):
    c = shape[1]
    if big_mean:  # the mean dwarfs the spread: E[x^2]-E[x]^2 in fp32 would return noise
        x = 1e4 + 1e-2 * torch.randn(shape, dtype=torch.float64)
    else:
        x = torch.randn(shape, dtype=torch.float64) * torch.rand(c, dtype=torch.float64).add(0.5).view(
            [1, c] + [1] * (len(shape) - 2)) * 3 + torch.randn(c, dtype=torch.float64).view([1, c] + [1] * (len(shape) - 2))
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _buffers(c, t):
    # running stats that make r and d clip for some channels once t allows them to move
    return (torch.randn(c) * 0.7, torch.rand(c) * 2 + 0.3, torch.tensor(t, dtype=torch.long))


def _run(fn, x, bufs, weight, bias, training, **kw):
    x = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    y = fn(x, *bufs, w, b, training=training, **kw)
    return x, w, b, y


def _compare(shape, dtype, channels_last, training, t, affine=True, big_mean=False, steps=1):
    c = shape[1]
    x0 = _make(shape, dtype, channels_last, big_mean)
    weight = torch.randn(c) if affine else None
    bias = torch.randn(c) if affine else None
    bufs_k = _buffers(c, t)
    bufs_r = tuple(b.clone() for b in bufs_k)
    tol = ULP[dtype]
    for step in range(steps):
        x = x0 if step == 0 else _make(shape, dtype, channels_last, big_mean)
        xk, wk, bk, yk = _run(sk.batch_renorm, x, bufs_k, weight, bias, training, backend="triton")
        xr, wr, br, yr = _run(batch_renorm_reference, x, bufs_r, weight, bias, training)
        assert yk.dtype == x.dtype and yk.shape == x.shape
        if channels_last:
            assert yk.stride() == x.stride(), "output must keep the input's memory layout"
        scale = yr.detach().abs().max().item() + 1e-30
        assert_close(yk, yr, atol=tol * scale, rtol=tol, name=f"y step {step}")
        dy = torch.randn_like(yr)
        yk.backward(dy)
        yr.backward(dy)
        # dx = A*(dy - mean(dy) - ...) cancels terms of size |A*dy|, A = w*r/sigma (or w/rs):
        # the error scales with those terms, not with the (possibly tiny) result.
        dims = [0] + list(range(2, x.dim()))
        sigma = x.double().std(dims, unbiased=False) + 1e-3
        w_abs = weight.abs().max().item() if affine else 1.0
        a_max = w_abs * max(3.0 / sigma.min().item(), 1.0 / bufs_r[1].min().item(), 1.0 / bufs_k[1].min().item())
        gscale = dy.abs().max().item() * a_max
        assert_close(xk.grad, xr.grad, atol=tol * gscale, rtol=tol, name=f"dx step {step}")
        if affine:
            # the sums are fp32 in both; scale by the sum of |terms| they add up
            xhat = (yr.detach().double() - bias.view([1, c] + [1] * (x.dim() - 2))) / weight.view([1, c] + [1] * (x.dim() - 2))
            w_scale = (dy.double() * xhat).abs().sum(dims) + dy.double().abs().sum(dims)
            diff_w = (wk.grad.double() - wr.grad.double()).abs()
            diff_b = (bk.grad.double() - br.grad.double()).abs()
            assert (diff_w <= 1e-5 * w_scale + 1e-7).all(), f"dweight differs: {diff_w} vs bound {1e-5 * w_scale}"
            assert (diff_b <= 1e-5 * dy.double().abs().sum(dims) + 1e-7).all(), f"dbias differs: {diff_b}"
        for name, a, b in zip(("running_mean", "running_std", "num_batches_tracked"), bufs_k, bufs_r):
            if a.dtype == torch.long:
                assert int(a) == int(b), f"{name}: {int(a)} != {int(b)}"
            else:
                assert_close(a, b, atol=1e-6 * (b.abs().max().item() + 1), rtol=1e-5, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp32_matches_reference(shape, training):
    _compare(shape, torch.float32, False, training, t=12000)


@pytest.mark.parametrize("t", [0, 7000, 60000], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_schedule_and_clipping(t, affine):
    # t=0: r_max=1, d_max=0 (plain batch norm); 7000: limits small enough that r, d clip;
    # 60000: r_max=3, d_max=5.
    _compare((6, 5, 4, 3), torch.float32, False, True, t=t, affine=affine, steps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (3, 70, 2, 3), (2, 3, 4, 5, 3)], ids=str)
def test_dtypes_and_layouts(dtype, channels_last, shape):
    _compare(shape, dtype, channels_last, True, t=9000, steps=2)
    _compare(shape, dtype, channels_last, False, t=9000)


def test_big_mean_small_variance_beats_fp32_reference():
    # 1e4 + 1e-2*randn: the kernel's shifted sums must hold up against an fp64 reference at
    # least as well as the fp32 reference does (flash-attention's rule for lower precision).
    shape = (8, 3, 6, 6)
    x = _make(shape, torch.float32, big_mean=True)
    out = {}
    for name, fn, dt in (("kernel", sk.batch_renorm, torch.float32), ("ref32", batch_renorm_reference, torch.float32),
                         ("ref64", batch_renorm_reference, torch.float64)):
        bufs = tuple(b.to(dt) if b.is_floating_point() else b for b in (torch.zeros(3), torch.ones(3), torch.tensor(0)))
        kw = {"backend": "triton"} if name == "kernel" else {}
        out[name] = fn(x.to(dt), *bufs, training=True, **kw).double()
    err_kernel = (out["kernel"] - out["ref64"]).abs().max().item()
    err_ref32 = (out["ref32"] - out["ref64"]).abs().max().item()
    assert err_kernel <= max(2 * err_ref32, 1e-5), (err_kernel, err_ref32)
    assert out["ref64"].std() > 0.5  # the data really normalizes to unit spread


def test_channels_last_3d_and_strided_input():
    _compare((2, 3, 4, 5, 3), torch.float32, True, True, t=100)
    x = torch.randn(4, 6, 5, 7)[:, ::2]  # neither contiguous nor channels_last: copied once
    bufs = _buffers(3, 5)
    ref_bufs = tuple(b.clone() for b in bufs)
    y = sk.batch_renorm(x, *bufs, backend="triton")
    yr = batch_renorm_reference(x, *ref_bufs)
    assert_close(y, yr, atol=1e-5 * yr.abs().max().item(), rtol=1e-5, name="strided y")


def test_gradient_layout_differs_from_input():
    x = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    bufs = _buffers(4, 300)
    ref_bufs = tuple(b.clone() for b in bufs)
    dy = torch.randn(3, 4, 5, 6)  # contiguous while x is channels_last
    sk.batch_renorm(x, *bufs, backend="triton").backward(dy)
    batch_renorm_reference(xr, *ref_bufs).backward(dy)
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


def test_custom_schedules():
    x = torch.randn(6, 3, 4, 4) * 4 + 2
    for r_max, d_max in ((1.5, 0.5), (RenormSchedule(1e-3, 1.0, 1.0, 2.0), RenormSchedule(1e-3, 0.0, 0.0, 1.0))):
        mk = FusedBatchRenorm2d(3, r_max=r_max, d_max=d_max, backend="triton")
        mr = FusedBatchRenorm2d(3, r_max=r_max, d_max=d_max, backend="reference")
        for m in (mk, mr):
            m.running_std.fill_(0.5)
            m.num_batches_tracked.fill_(200)
        assert_close(mk(x), mr(x), atol=1e-5 * 10, rtol=1e-5, name=f"y with r_max={r_max}")
    with pytest.raises(TypeError, match="r_max"):
        FusedBatchRenorm2d(3, r_max="big")


@pytest.mark.parametrize("module_cls,shape,affine", [
    (FusedBatchRenorm1d, (8, 5), True), (FusedBatchRenorm1d, (4, 5, 6), False),
    (FusedBatchRenorm2d, (4, 5, 6, 3), True), (FusedBatchRenorm3d, (2, 5, 3, 4, 2), True)])
def test_drop_in_for_third_party_layer(module_cls, shape, affine):
    third = ThirdPartyBatchRenorm(shape[1], affine=affine)
    with torch.no_grad():  # a trained-looking state
        third.weight.normal_()
        third.bias.normal_()
        third.running_mean.normal_()
        third.running_std.uniform_(0.5, 2.0)
        third.num_batches_tracked.fill_(15000)
    fused = module_cls(shape[1], affine=affine, backend="triton")
    fused.load_state_dict(third.state_dict())
    for step in range(3):
        x = torch.randn(shape) * 2 + 1
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
    x = torch.randn(shape)
    assert_close(fused(x), third(x), atol=1e-5 * 10, rtol=1e-5, name="eval y")


def test_state_dict_round_trip(tmp_path):
    m = FusedBatchRenorm2d(4, backend="triton")
    for _ in range(3):
        m(torch.randn(3, 4, 5, 5) * 2 + 1)
    path = tmp_path / "layer.pt"
    torch.save(m.state_dict(), path)
    m2 = FusedBatchRenorm2d(4, backend="triton")
    m2.load_state_dict(torch.load(path, weights_only=True))
    assert sorted(m2.state_dict()) == ["bias", "num_batches_tracked", "running_mean", "running_std", "weight"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert int(m2.num_batches_tracked) == 3


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_inputs_leave_buffers_untouched(backend):
    m = FusedBatchRenorm2d(3, backend=backend)
    m(torch.randn(2, 3, 4, 4) + 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cases = [
        (torch.randn(2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
        (torch.randn(2, 3, 4, 4, 1), ValueError, r"expected 4D input \(got 5D input\)"),
        (torch.randn(2, 5, 4, 4), ValueError, r"expected 3 channels .* got 5"),
        (torch.randint(0, 5, (2, 3, 4, 4)), TypeError, r"floating-point input, got dtype torch.int64"),
        (torch.randn(0, 3, 4, 4), ValueError, r"non-empty input, got shape \(0, 3, 4, 4\)"),
        ("not a tensor", TypeError, r"torch.Tensor input, got str"),
    ]
    for x, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a rejected input"
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
    bufs = _buffers(3, 0)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        sk.batch_renorm(x, *bufs, backend="cuda")
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16, got torch.float64"):
        sk.batch_renorm(x.double(), *(b.double() if b.is_floating_point() else b for b in bufs), backend="triton")
    # float64 under auto falls back to the reference quietly, and is exact there
    y = sk.batch_renorm(x.double(), *(b.double() if b.is_floating_point() else b.clone() for b in bufs))
    assert y.dtype == torch.float64


def test_no_host_sync_in_forward_backward(monkeypatch):
    # .item()/bool() on a tensor would synchronize with the device; make them fail loudly.
    m = FusedBatchRenorm2d(3, backend="triton")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization in the layer")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    m(x).sum().backward()
