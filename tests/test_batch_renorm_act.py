"""The norm block (BatchRenorm -> activation -> dropout) on every backend, and its mask stream.

Accuracy: speckle_kernels/testing/batch_renorm_act.py runs every BatchRenorm kit case with an activation and
a dropout rate and holds each fused backend to twice the fp32 reference's error against float64
plus one ulp (judged on the backend's own activation branches, which may differ from float64's
only within the reference's error of z). Masks: each backend's equals the documented stream
bit for bit; the stream's statistics are tested once, on the reference.

Mask statistics over n = 2**20 elements, 5 standard errors (a two-sided false alarm of 6e-7 a
check): the keep rate of a Bernoulli(1 - p) has standard error sqrt(p (1 - p) / n); the
correlation of two independent indicators (neighbours, or the same place in two consecutive
calls) has standard error 1 / sqrt(n).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from speckle_kernels.batch_renorm_act_contract import ACTIVATIONS
from speckle_kernels.reference import batch_renorm_act_reference, batch_renorm_reference, dropout_keep_mask

from speckle_kernels.testing import batch_renorm_act as block_kit
from speckle_kernels.testing.backends import require

FUSED = ("cpu", "triton", "cuda")
DRAWS = 2

N = 1 << 20


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a * b).mean().item() / (a.std(unbiased=False) * b.std(unbiased=False)).item()


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_keep_rate_and_independence(p):
    keep = dropout_keep_mask((N,), p, seed=7, offset=3)
    se = math.sqrt(p * (1 - p) / N)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * se
    assert abs(_corr(keep[1:], keep[:-1])) < 5 / math.sqrt(N)              # neighbours
    following = dropout_keep_mask((N,), p, seed=7, offset=3 + N)            # the next call
    assert abs(_corr(keep, following)) < 5 / math.sqrt(N)


def test_mask_is_reproducible_and_keyed():
    a = dropout_keep_mask((4, 3, 8, 8), 0.3, seed=1, offset=10)
    assert torch.equal(a, dropout_keep_mask((4, 3, 8, 8), 0.3, seed=1, offset=10))
    for other in (dict(seed=2, offset=10), dict(seed=1, offset=11)):
        b = dropout_keep_mask((4, 3, 8, 8), 0.3, **other)
        assert (a != b).double().mean().item() > 0.2  # independent masks differ in 2p(1-p) = 42%
    # a split call (offset moved by the first part's size) gives the same bits
    whole = dropout_keep_mask((6, 50), 0.3, seed=1, offset=10)
    tail = dropout_keep_mask((4, 50), 0.3, seed=1, offset=10 + 100)
    assert torch.equal(whole[2:], tail)
    assert dropout_keep_mask((3, 5), 0.0).all()


def _state(c, t=20000):
    return [torch.randn(c) * 0.7, torch.rand(c) * 2 + 0.3, torch.tensor(t)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_is_the_composition(activation):
    x = torch.randn(4, 3, 5, 7) * 2 + 1
    w, b = torch.randn(3), torch.randn(3)
    s1 = _state(3)
    s2 = [t.clone() for t in s1]
    p, kw = 0.3, dict(seed=5, offset=17)
    y = batch_renorm_act_reference(x, *s1, w, b, activation=activation, negative_slope=0.2, dropout=p, **kw)
    z = batch_renorm_reference(x, *s2, w, b)
    z = {"identity": z, "relu": F.relu(z), "leaky_relu": F.leaky_relu(z, 0.2)}[activation]
    keep = dropout_keep_mask(tuple(x.shape), p, **kw)
    torch.testing.assert_close(y, torch.where(keep, z / (1 - p), torch.zeros_like(z)), rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))  # the same running-statistics update


def test_dropout_semantics_of_nn_dropout():
    x = torch.randn(4, 3, 5, 7, requires_grad=True)
    w, b = torch.randn(3), torch.randn(3)
    # p = 0: the composition without dropout, and the same running-statistics update
    s0 = _state(3)
    s0_copy = [t.clone() for t in s0]
    no_drop = batch_renorm_act_reference(x, *s0, w, b, dropout=0.0)
    torch.testing.assert_close(no_drop, F.leaky_relu(batch_renorm_reference(x, *s0_copy, w, b), 0.1),
                               rtol=0, atol=0)
    # eval: no dropout at all, whatever p
    s = _state(3)
    y_eval = batch_renorm_act_reference(x, *s, w, b, training=False, dropout=0.5)
    z_eval = F.leaky_relu(batch_renorm_reference(x, *s, w, b, training=False), 0.1)
    torch.testing.assert_close(y_eval, z_eval, rtol=0, atol=0)
    # training: dropped elements get no gradient, kept ones the scaled one
    sa = _state(3)
    y = batch_renorm_act_reference(x, *[t.clone() for t in sa], w, b, dropout=0.5, seed=3)
    keep = dropout_keep_mask(tuple(x.shape), 0.5, seed=3)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    assert torch.isfinite(g).all()
    assert ((y == 0) | keep).all()
    # kept elements carry 1 / (1 - p) = 2 times the undropped block's gradient
    z = F.leaky_relu(batch_renorm_reference(x, *[t.clone() for t in sa], w, b), 0.1)
    (g_plain,) = torch.autograd.grad(torch.where(keep, 2 * z, torch.zeros_like(z)).sum(), x)
    torch.testing.assert_close(g, g_plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(activation="gelu"), "activation must be one of"),
    (dict(dropout=1.0), r"dropout must lie in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must lie in \[0, 1\), got -0.1"),
    (dict(dropout=0.1, seed=-1), "seed"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        batch_renorm_act_reference(torch.randn(2, 3, 4, 4), *_state(3), **kwargs)


@pytest.mark.parametrize("case", block_kit.CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", FUSED)
def test_block_against_float64(backend, case):
    device = require(backend)
    for k in range(DRAWS):
        d = block_kit.draw(case, zlib.crc32(f"{case.id}/{k}".encode()), device)
        verdict = block_kit.judge(backend, case, d)
        assert not verdict.failures, verdict.report() + "\n" + "\n".join(verdict.failures)


def test_block_headline_shape_on_the_cpu_backend():
    require("cpu")
    d = block_kit.draw(block_kit.HEADLINE, 4242)
    verdict = block_kit.judge("cpu", block_kit.HEADLINE, d)
    assert not verdict.failures, verdict.report()


@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 9), False), ((3, 5, 7, 9), True),
                                                  ((2, 3, 4, 5, 3), True), ((7, 3), False),
                                                  ((2, 70, 3, 5), True), ((1, 1, 1, 1), False)])
@pytest.mark.parametrize("backend", FUSED)
def test_backend_mask_is_the_stream(backend, shape, channels_last):
    device = require(backend)
    for seed, offset in ((2 ** 40 + 3, 5), (11, 2 ** 33 + 2)):
        want = dropout_keep_mask(shape, 0.3, seed=seed, offset=offset, device=device)
        got = block_kit.backend_mask(backend, shape, 0.3, seed=seed, offset=offset, device=device,
                                     channels_last=channels_last)
        assert torch.equal(got, want)
