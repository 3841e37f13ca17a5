"""The norm block's Triton backend (batch_renorm_act_triton.py) under the interpreter, against
reference.batch_renorm_act_reference in fp32 through autograd and reference.dropout_keep_mask.

Tolerance (fp32). Both sides evaluate the same formulas in fp32 on the same inputs; they differ
in the per-channel reductions: the kernels merge their statistics and gradient sums in fp64,
torch reduces in fp32, whose error grows with log2(n) rounding units u = 2**-24 (n < 2**10
values a channel here: <= 10u relative to the reduced magnitudes). Every output is then a short
chain of fp32 operations on those per-channel constants (centre, scale, shift, activation,
keep scale; backward: subtract the mean, scale, add B*u), a handful of roundings more. So each
element's error is below K*u times the magnitudes that enter it, with K = 64 = (10 + ~6
roundings) x 2 (dropout's keep scale <= 2) x 2 (slack). We take the magnitude as the largest of
the quantity over the tensor (elementwise magnitudes would demand too much where y or dx
cancel, e.g. near z = 0 or g = mean(g)). dweight and dbias are sums of n terms: their
magnitude is the sum of |terms|, S(|g|*(1 + |z|)). The running buffers: K*u*max|.|.
Half precision: the kernel computes in fp32 from the exact half input and rounds y and dx once,
so their tolerance adds half an ulp of the dtype, 2**-(mantissa+1), relative to each element;
a whole ulp for bf16, whose fp32 -> bf16 cast truncates under the interpreter (a GPU rounds).
A test that cannot fail is a defect: every tensor compared here is random and non-zero, and
test_tolerance_catches_a_wrong_slope checks that the tolerance sees an error of one slope.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import speckle_kernels as sk  # noqa: E402
from speckle_kernels import batch_renorm_act_triton as bat  # noqa: E402
from speckle_kernels._backend import triton_interpreting  # noqa: E402
from speckle_kernels.batch_renorm_act_contract import keep_scale, negative_side_slope  # noqa: E402
from speckle_kernels.batch_renorm_contract import GRAD_A, GRAD_BIAS, GRAD_WEIGHT, N_GRADS  # noqa: E402
from speckle_kernels.reference import batch_renorm_act_reference, dropout_keep_mask  # noqa: E402
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

if not triton_interpreting():
    pytest.skip("the Triton tests run on CPU tensors under TRITON_INTERPRET=1", allow_module_level=True)

U32 = 2.0 ** -24
K = 64
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
ACT_NAMES = {0: "identity", 1: "relu", 2: "leaky_relu"}
MOMENTUM, EPS = 0.01, 1e-3


def _buffers(c, t):
    return [torch.randn(c) * 0.5, torch.rand(c) + 0.5, torch.tensor(t, dtype=torch.int64)]


def _input(shape, dtype, channels_last):
    # per-channel means and spreads; away from zero, so a dropped element is exactly 0 only there
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape) * (torch.rand(view) + 0.5) + torch.randn(view)
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _run_kernel(x, dy, w, b, bufs, *, training, activation, slope, p, rng, quads):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    if quads:
        y = bat.batch_renorm_act(x, w, b, *bufs, training=training, momentum=MOMENTUM, eps=EPS,
                                 r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE, activation=activation,
                                 negative_slope=slope, dropout=p, rng=rng)
    else:  # the per-element Philox path: the same ops' functions with quads off
        stats = bat.batch_renorm_statistics(x.detach(), w.detach(), b.detach(), *bufs, training=training,
                                            momentum=MOMENTUM, eps=EPS, r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
        s = negative_side_slope(activation, slope)
        y = bat.block_forward(x.detach(), stats, rng, training=training, slope=s, dropout=p, quads=False)
        dx, grads = bat.block_backward(dy, x.detach(), w.detach(), stats, rng, training=training, slope=s,
                                       dropout=p, quads=False)
        return y, dx, grads[GRAD_WEIGHT], grads[GRAD_BIAS]
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def _run_reference(x, dy, w, b, bufs, *, training, activation, slope, p, seed, offset):
    x = x.detach().float().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = batch_renorm_act_reference(x, *bufs, w, b, training=training, momentum=MOMENTUM, eps=EPS,
                                   activation=ACT_NAMES[activation], negative_slope=slope, dropout=p,
                                   seed=seed, offset=offset)
    y.backward(dy.float())
    return y.detach(), x.grad, w.grad, b.grad


def _z_reference(x, w, b, bufs, training):
    """The pre-activation in fp32 (buffers copied: no second update)."""
    from speckle_kernels.reference import batch_renorm_reference
    return batch_renorm_reference(x.detach().float(), *[t.clone() for t in bufs], w, b, training=training,
                                  momentum=MOMENTUM, eps=EPS)


def _check(got, want, z, dy, p, dtype, bufs_got, bufs_want):
    y, dx, dw, db = got
    y_r, dx_r, dw_r, db_r = want
    half = 0.0 if dtype == torch.float32 else 2.0 ** -(MANTISSA[dtype] + (dtype == torch.float16))
    for name, a, r in (("y", y, y_r), ("dx", dx, dx_r)):
        assert a.dtype == dtype and a.stride() == dy.stride(), (name, a.dtype, a.stride())
        assert_close(a, r, atol=K * U32 * r.abs().max().item(), rtol=half, name=name)
    dims = [d for d in range(z.dim()) if d != 1]
    scale = 1.0 / (1.0 - p) if p else 1.0
    mag = (dy.float().abs() * scale * (1 + z.abs())).sum(dims)
    for name, a, r in (("dweight", dw, dw_r), ("dbias", db, db_r)):
        bad = (a.double() - r.double()).abs() > K * U32 * mag.double()
        assert not bad.any(), f"{name}: {a[bad]} vs {r[bad]} (bound {K * U32 * mag[bad]})"
    for name, a, r in zip(("running_mean", "running_std", "num_batches_tracked"), bufs_got, bufs_want):
        if r.dtype == torch.int64:
            assert torch.equal(a, r), name
        else:
            assert_close(a, r, atol=K * U32 * r.abs().max().item(), rtol=0.0, name=name)


CASES = [
    # shape, dtype, channels_last, activation, p, quads
    ((3, 5, 7, 9), torch.float32, False, 2, 0.3, True),
    ((3, 5, 7, 9), torch.float32, False, 1, 0.3, False),
    ((3, 5, 7, 9), torch.float32, True, 2, 0.25, True),
    ((2, 3, 4, 5, 3), torch.float32, True, 0, 0.5, False),
    ((2, 70, 3, 5), torch.float32, True, 1, 0.1, True),     # more channels than a block
    ((4, 3, 11), torch.float32, False, 2, 0.0, True),       # no dropout, 1d
    ((5, 4), torch.float32, False, 2, 0.3, True),           # (N, C): L = 1, per-element path
    ((2, 3, 13, 9), torch.float16, False, 2, 0.3, True),
    ((2, 3, 13, 9), torch.bfloat16, True, 1, 0.3, True),
    ((2, 3, 6, 7), torch.bfloat16, False, 0, 0.2, False),
]


@pytest.mark.parametrize("shape,dtype,channels_last,activation,p,quads", CASES,
                         ids=lambda v: str(v).replace(" ", "").replace("torch.", ""))
def test_matches_reference(shape, dtype, channels_last, activation, p, quads, one_thread):
    c = shape[1]
    x = _input(shape, dtype, channels_last)
    dy = torch.randn(shape).to(dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    seed, offset, slope = 2**33 + 12345, 4 * 1000 + 3, 0.2
    rng = torch.tensor([seed, offset])
    bufs = _buffers(c, 20000)
    for training in (True, False):
        ref_bufs = [t.clone() for t in bufs]
        z = _z_reference(x, w, b, bufs, training)
        got = _run_kernel(x, dy, w, b, bufs, training=training, activation=activation, slope=slope, p=p,
                          rng=rng, quads=quads)
        want = _run_reference(x, dy, w, b, ref_bufs, training=training, activation=activation, slope=slope,
                              p=p, seed=seed, offset=offset)
        _check(got, want, z, dy, p if training else 0.0, dtype, bufs, ref_bufs)
    assert torch.equal(rng, torch.tensor([seed, offset]))  # never modified


def test_tolerance_catches_a_wrong_slope(one_thread):
    # the comparison above is not vacuous: leaky_relu's slope off by 0.01 fails it
    shape = (2, 3, 5, 6)
    x, dy = _input(shape, torch.float32, False), torch.randn(shape)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    bufs = _buffers(3, 20000)
    ref_bufs = [t.clone() for t in bufs]
    z = _z_reference(x, w, b, bufs, True)
    rng = torch.tensor([5, 6])
    got = _run_kernel(x, dy, w, b, bufs, training=True, activation=2, slope=0.21, p=0.3, rng=rng, quads=True)
    want = _run_reference(x, dy, w, b, ref_bufs, training=True, activation=2, slope=0.2, p=0.3, seed=5, offset=6)
    with pytest.raises(AssertionError, match="y:"):
        _check(got, want, z, dy, 0.3, torch.float32, bufs, ref_bufs)


MASK_CASES = [
    # shape, channels_last, seed, offset
    ((3, 5, 7, 9), False, 2**40 + 7, 13),
    ((3, 5, 7, 9), True, 2**32, 2**34 + 1),
    ((2, 70, 3, 5), True, 99, 6),
    ((2, 3, 4, 5, 3), True, 2**62 + 3, 5),
    ((1, 2, 37), False, 1, 2),
    ((7, 3), False, 3, 1),
]


def _mask_case_inputs(shape, channels_last, seed, offset):
    x = _input(shape, torch.float32, channels_last)
    bufs = _buffers(shape[1], 20000)
    stats = bat.batch_renorm_statistics(x, None, None, *bufs, training=True, momentum=MOMENTUM, eps=EPS,
                                        r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
    return x, stats, torch.tensor([seed, offset])


@pytest.mark.parametrize("quads", [False, True], ids=["per-element", "per-quad"])
@pytest.mark.parametrize("shape,channels_last,seed,offset", MASK_CASES, ids=str)
def test_forward_mask_is_the_stream(shape, channels_last, seed, offset, quads, one_thread):
    p = 0.37
    x, stats, rng = _mask_case_inputs(shape, channels_last, seed, offset)
    y = bat.block_forward(x, stats, rng, training=True, slope=1.0, dropout=p, quads=quads)  # identity
    keep = dropout_keep_mask(shape, p, seed=seed, offset=offset)
    z = bat.block_forward(x, stats, rng, training=False, slope=1.0, dropout=p, quads=quads)  # no mask
    assert (z != 0).all()
    assert torch.equal(y != 0, keep)
    ks = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(y[keep], z[keep] * ks)


@pytest.mark.parametrize("quads", [False, True], ids=["per-element", "per-quad"])
@pytest.mark.parametrize("shape,channels_last,seed,offset", MASK_CASES[:3], ids=str)
def test_backward_mask_is_the_stream(shape, channels_last, seed, offset, quads, one_thread):
    # the dx pass with A = 1, B = 0, mean_g = 0 writes g = keep * keep_scale * dy itself
    p = 0.37
    x, stats, rng = _mask_case_inputs(shape, channels_last, seed, offset)
    layout = bat._BlockLayout(x, quads)
    dy = torch.empty_like(layout.tensor).copy_(torch.rand(shape) + 0.5)
    grads = torch.zeros((N_GRADS, shape[1]))
    grads[GRAD_A] = 1.0
    g = torch.empty_like(layout.tensor)
    layout.launch(bat.MODE_DX, layout.tensor, dy, g, stats, grads, None, rng, programs=layout.n_tiles,
                  tiles_per_program=1, dropout=p, keep_scale=keep_scale(p), slope=1.0)
    keep = dropout_keep_mask(shape, p, seed=seed, offset=offset)
    assert torch.equal(g != 0, keep)
    assert torch.equal(g[keep], dy[keep] * torch.tensor(1 / (1 - p), dtype=torch.float32))


def test_eval_has_no_dropout_and_keeps_buffers(one_thread):
    shape = (2, 3, 5, 7)
    x = _input(shape, torch.float32, False)
    bufs = _buffers(3, 100)
    before = [t.clone() for t in bufs]
    y = bat.batch_renorm_act(x, None, None, *bufs, training=False, momentum=MOMENTUM, eps=EPS,
                             r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE, activation=0, negative_slope=0.0,
                             dropout=0.5, rng=torch.tensor([1, 2]))
    want = batch_renorm_act_reference(x, *[t.clone() for t in bufs], training=False, activation="identity",
                                      dropout=0.5, seed=1, offset=2)
    assert (y != 0).all()
    assert_close(y, want, atol=K * U32 * want.abs().max().item(), rtol=0.0, name="y")
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))


def test_opcheck_of_the_block_ops(one_thread):
    shape = (2, 3, 5, 4)
    x = _input(shape, torch.float32, False)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    bufs = _buffers(3, 20000)
    stats = bat.batch_renorm_statistics(x, w, b, *bufs, training=True, momentum=MOMENTUM, eps=EPS,
                                        r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE)
    rng = torch.tensor([2**35, 7])
    xr = x.clone().requires_grad_(True)
    torch.library.opcheck(bat.batch_renorm_act_triton_forward, (xr, w, b, stats, True, 0.1, 0.3, rng))
    torch.library.opcheck(bat.batch_renorm_act_triton_backward,
                          (torch.randn(shape), x, w, stats, True, 0.1, 0.3, rng))


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(activation="gelu"), ValueError, "activation must be"),
    (dict(dropout=1.0), ValueError, r"dropout must lie in \[0, 1\), got 1.0"),
    (dict(rng=torch.tensor([1, 2], dtype=torch.int32)), ValueError, "rng must be an int64"),
    (dict(rng=torch.tensor([1, 2, 3])), ValueError, r"shape \(3,\)"),
])
def test_bad_arguments_leave_buffers_untouched(kwargs, error, pattern):
    # the dispatcher checks once for every backend (batch_renorm_act_contract.py)
    args = dict(activation="relu", dropout=0.1, rng=torch.tensor([1, 2]))
    args.update(kwargs)
    bufs = _buffers(3, 0)
    before = [t.clone() for t in bufs]
    with pytest.raises(error, match=pattern):
        sk.batch_renorm_act(torch.randn(2, 3, 4), *bufs, training=True, backend="triton", **args)
    assert all(torch.equal(a, b) for a, b in zip(bufs, before))


def test_torch_compile_fullgraph_traces_the_ops(one_thread):
    # the registered ops under torch.compile give the eager path's y, gradients and buffers
    def block(x, w, b, rm, rs, t, rng):
        return bat.batch_renorm_act(x, w, b, rm, rs, t, training=True, momentum=MOMENTUM, eps=EPS,
                                    r_max=RMAX_SCHEDULE, d_max=DMAX_SCHEDULE, activation=2, negative_slope=0.1,
                                    dropout=0.3, rng=rng)

    x = _input((2, 3, 5, 6), torch.float32, False)
    w, b, rng = torch.rand(3) + 0.5, torch.randn(3), torch.tensor([2**33, 7])
    bufs = _buffers(3, 20000)
    runs = []
    for fn, state in ((block, bufs), (torch.compile(block, fullgraph=True, backend="aot_eager"),
                                      [t.clone() for t in bufs])):
        xs = x.clone().requires_grad_(True)
        y = fn(xs, w, b, *state, rng)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        runs.append((y.detach(), xs.grad, *state))
    assert (runs[0][0] == 0).any() and (runs[0][1] != 0).any()
    assert all(torch.equal(a, c) for a, c in zip(*runs))
