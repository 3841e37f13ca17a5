"""What only the C++ CPU norm-block kernels (csrc/cpu/batch_renorm_act_cpu.cpp) have, called as
torch.ops directly: the dropout mask stream bit for bit in both layouts, the two schedules and
the thread count changing no bit, batch_renorm_stats, agreement with the fp32 reference within
a derived tolerance, and the ops' own argument checks.

Tolerance against reference.batch_renorm_act_reference (fp32, autograd through it): both sides
round in fp32, so the difference is bounded by the sum of their rounding errors, each a few
units of eps = 2**-24 of the magnitudes that enter a result, plus the reference's fp32 sums over
the n values of a channel (torch reduces pairwise: <= log2(n) roundings a term):
  y        the affine z = (x - mean)*scale + shift takes ~4 roundings and the statistics a
           relative error <= log2(n) eps each, on the magnitude m_y = |scale|*(max|x - mean| +
           |mean|) + |shift|; activation and keep_scale multiply by <= keep_scale*max(1, slope)
  dx       A*(g - mean_g - xhat*mean(g*xhat)) with fp32 sums of g and g*u: magnitude
           m_dx = |A|*(max|g| + mean|g| + max|xhat|*mean|g*xhat|)
  dweight  r*S(g*xhat) + d*S(g): m = r*S|g*xhat| + |d|*S|g|;  dbias  S(g): m = S|g|
with the factor k = 4*(log2(n) + 4) eps on each magnitude (x4: two sides, and the products of
two rounded factors). A wrong mask, slope or keep_scale moves a result by O(m): far outside.
"""
from __future__ import annotations

import math

import pytest
import torch

from speckle_kernels import _ext
from speckle_kernels.batch_renorm_act_contract import ACTIVATIONS
from speckle_kernels.batch_renorm_act_contract import keep_scale
from speckle_kernels.batch_renorm_contract import STAT_D, STAT_R, STAT_SCALE, STAT_SHIFT, STAT_SIGMA
from speckle_kernels.reference import batch_renorm_act_reference, dropout_keep_mask
from speckle_kernels.schedules import DMAX_SCHEDULE, RMAX_SCHEDULE

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")

OPS = torch.ops.speckle_kernels
EPS32 = 2.0 ** -24


def _input(shape, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    view = [1, shape[1]] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g) * (2 * torch.rand(view, generator=g) + 0.5) \
        + 3 * torch.randn(view, generator=g) + 1.0  # non-zero means, per-channel spreads
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _params(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    state = [torch.randn(c, generator=g) * 0.7, torch.rand(c, generator=g) * 2 + 0.3, torch.tensor(20000)]
    return torch.randn(c, generator=g), torch.randn(c, generator=g), state


def _forward(x, w, b, state, *, training=True, act=2, slope=0.1, p=0.0, rng=(0, 0)):
    return OPS.batch_renorm_act_forward(x, w, b, *state, training, 0.01, 1e-3, RMAX_SCHEDULE.as_list(),
                                        DMAX_SCHEDULE.as_list(), act, slope, p, torch.tensor(rng))


def _backward(dy, x, w, stats, *, training=True, act=2, slope=0.1, p=0.0, rng=(0, 0)):
    return OPS.batch_renorm_act_backward(dy, x, w, stats, training, act, slope, p, torch.tensor(rng))


def _block(x, *, dy=None, seed=2, training=True, act=2, p=0.2, rng=(5, 3)):
    """(y, stats, dx, dweight, dbias, running_mean, running_std) of the op pair."""
    w, b, state = _params(x.shape[1], seed)
    dy = (_input(x.shape, seed=seed + 10) - 1.0).to(x.dtype) if dy is None else dy
    y, stats = _forward(x, w, b, state, training=training, act=act, p=p, rng=rng)
    return (y, stats, *_backward(dy, x, w, stats, training=training, act=act, p=p, rng=rng), state[0], state[1])


# ---------------------------------------------------------------------------------------------
# The mask stream

MASK_CASES = [((3, 5, 7, 9), 0, 0), ((3, 5, 7, 9), 1, 2 ** 32 + 7), ((2, 3, 5, 4, 3), 2, 2 ** 62 + 1),
              ((1, 1, 1, 1), 3, 9), ((4, 17, 3, 1), 5, 11), ((2, 2, 131, 129), 2 ** 40 + 3, 12345)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,offset,seed", MASK_CASES, ids=str)
def test_masks_are_the_reference_stream(shape, offset, seed, layout):
    # (2, 2, 131, 129): two chunks a plane, the second starting at e = 16384 + offset.
    x = _input(shape, layout=layout)
    w, b, state = _params(shape[1])
    keep = dropout_keep_mask(shape, 0.3, seed=seed, offset=offset)
    assert 0.5 < keep.double().mean().item() < 0.9 or keep.numel() < 64
    # forward, identity: y == 0 exactly where dropped (z == 0 has probability ~0 here)
    y, stats = _forward(x, w, b, state, act=0, p=0.3, rng=(seed, offset))
    assert torch.equal(y != 0, keep)
    # backward, identity: dbias = S(mask * keep_scale * dy) per channel, which one flipped bit
    # moves by |dy| * keep_scale >> the fp32 sum's error (<= 64 eps S|g|, blocks of 64 a lane)
    dy = _input(shape, seed=4) - 0.5
    _, _, dbias = _backward(dy, x, w, stats, act=0, p=0.3, rng=(seed, offset))
    g = torch.where(keep, dy.double() * keep_scale(0.3), 0.0)
    dims = [0] + list(range(2, len(shape)))
    err = (dbias.double() - g.sum(dims)).abs()
    assert (err <= 64 * EPS32 * g.abs().sum(dims) + 1e-30).all(), err.max()


@pytest.mark.parametrize("width", torch.ops.speckle_kernels.cpu_noise_lane_widths())
def test_every_philox_lane_path_gives_the_same_mask(monkeypatch, width):
    monkeypatch.setenv("SPECKLE_CPU_NOISE_LANES", str(width))
    for layout in ("contiguous", "channels_last"):
        shape = (3, 6, 11, 13)
        x = _input(shape, layout=layout)
        w, b, state = _params(6)
        y, _ = _forward(x, w, b, state, act=0, p=0.4, rng=(2 ** 33 + 1, 7))
        assert torch.equal(y != 0, dropout_keep_mask(shape, 0.4, seed=2 ** 33 + 1, offset=7))


# ---------------------------------------------------------------------------------------------
# Same bits whatever the schedule or thread count

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 8, 64, 70), (2, 3, 130, 131), (5, 1, 7, 3), (3, 70, 2, 3)], ids=str)
def test_split_and_per_channel_schedules_agree_bit_for_bit(monkeypatch, shape, dtype):
    x = _input(shape, dtype)
    for training in (True, False):
        runs = []
        for schedule in ("split", "per-channel"):
            monkeypatch.setenv("SPECKLE_CPU_RENORM_SCHEDULE", schedule)
            runs.append(_block(x, training=training, p=0.25, rng=(9, 6)))
        for name, a, b in zip(("y", "stats", "dx", "dweight", "dbias", "rm", "rs"), *runs):
            assert torch.equal(a, b), f"{name} differs between schedules (training={training})"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_thread_count(layout):
    x = _input((4, 8, 64, 70), layout=layout)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_block(x, p=0.1, rng=(3, 1)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# batch_renorm_stats, and the block reducing to plain BatchRenorm

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"), (torch.bfloat16, "contiguous"),
                                          (torch.float32, "channels_last"), (torch.float16, "channels_last")])
def test_stats_op_is_the_forward_statistics_bit_for_bit(dtype, layout, training):
    x = _input((3, 7, 33, 35), dtype, layout)
    w, b, state = _params(7)
    other = [t.clone() for t in state]
    args = (training, 0.01, 1e-3, RMAX_SCHEDULE.as_list(), DMAX_SCHEDULE.as_list())
    _, stats = OPS.batch_renorm_forward(x, w, b, *state, *args)
    only = OPS.batch_renorm_stats(x, w, b, *other, *args)
    assert torch.equal(stats, only)
    for a, o in zip(state, other):
        assert torch.equal(a, o)
    assert training == (int(other[2]) == 20001)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_identity_without_dropout_is_batch_renorm_bit_for_bit(layout, training):
    # the hooks must add nothing to the passes when they have nothing to do; eval ignores p.
    x = _input((4, 5, 19, 23), layout=layout)
    w, b, state = _params(5)
    plain_state = [t.clone() for t in state]
    y, stats = _forward(x, w, b, state, training=training, act=0, p=0.0 if training else 0.5)
    y0, stats0 = OPS.batch_renorm_forward(x, w, b, *plain_state, training, 0.01, 1e-3,
                                          RMAX_SCHEDULE.as_list(), DMAX_SCHEDULE.as_list())
    assert torch.equal(y, y0) and torch.equal(stats, stats0)
    assert y.stride() == x.stride()
    dy = _input(x.shape, seed=5)
    got = _backward(dy, x, w, stats, training=training, act=0, p=0.0 if training else 0.5)
    for a, e in zip(got, OPS.batch_renorm_backward(dy, x, w, stats0, training)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_types_compute_in_fp32_and_round_once(dtype, layout):
    # the fp32 kernel on the widened input loads the very same fp32 values: one rounding of its
    # results must give the half-precision kernel's bits.
    x = _input((3, 6, 21, 22), dtype, layout)
    dy = (_input(x.shape, seed=12) - 1.0).to(dtype)
    half = _block(x, dy=dy, p=0.3)
    full = _block(x.float(), dy=dy.float(), p=0.3)
    assert half[0].dtype == dtype and half[2].dtype == dtype
    for name, h, f in zip(("y", "stats", "dx", "dweight", "dbias", "rm", "rs"), half, full):
        assert torch.equal(h, f.to(h.dtype)), name


# ---------------------------------------------------------------------------------------------
# Against the fp32 reference (tolerance derived in the module docstring)

def _reference(x, w, b, state, dy, *, training, act, slope, p, rng):
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = batch_renorm_act_reference(xr, *state, wr, br, training=training, activation=ACTIVATIONS[act],
                                   negative_slope=slope, dropout=p, seed=rng[0], offset=rng[1])
    return (y.detach(), *torch.autograd.grad(y, (xr, wr, br), dy))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("training,p", [(True, 0.0), (True, 0.3), (False, 0.3)])
@pytest.mark.parametrize("shape", [(4, 6, 31, 37), (2, 3, 130, 131), (8, 70, 3, 1)], ids=str)
def test_against_reference_within_derived_tolerance(shape, training, p, act, layout):
    slope, rng = (0.2 if act == 2 else 0.0), (2 ** 35 + 3, 6)
    x = _input(shape, layout=layout, seed=len(shape) + act)
    w, b, state = _params(shape[1], seed=act + 3)
    ref_state = [t.clone() for t in state]
    dy = _input(shape, seed=7) - 1.0
    y, stats = _forward(x, w, b, state, training=training, act=act, slope=slope, p=p, rng=rng)
    dx, dw, db = _backward(dy, x, w, stats, training=training, act=act, slope=slope, p=p, rng=rng)
    y_r, dx_r, dw_r, db_r = _reference(x, w, b, ref_state, dy, training=training, act=act, slope=slope,
                                       p=p, rng=rng)

    dims, view = [0] + list(range(2, len(shape))), [1, shape[1]] + [1] * (len(shape) - 2)
    n = x.numel() // shape[1]
    k = 4 * (math.log2(n) + 4) * EPS32
    chan = lambda row: stats[row].double().view(view)  # noqa: E731
    scale, shift, sigma, r, d = (chan(i) for i in (STAT_SCALE, STAT_SHIFT, STAT_SIGMA, STAT_R, STAT_D))
    xd = x.double()
    mean = xd.mean(dims, keepdim=True) if training else ref_state[0].double().view(view)
    gain = (1.0 / (1.0 - p) if training and p > 0 else 1.0) * max(1.0, abs(slope))
    m_y = scale.abs() * ((xd - mean).abs().amax(dims, keepdim=True) + mean.abs()) + shift.abs()
    assert ((y.double() - y_r.double()).abs() <= k * gain * m_y).all(), "y"

    keep = dropout_keep_mask(shape, p, seed=rng[0], offset=rng[1]) if training else torch.ones(shape, dtype=torch.bool)
    z = (xd - mean) * scale + shift  # z's sign decides act'; where |z| is tiny the sides may differ
    g = torch.where(keep, dy.double() * gain / max(1.0, abs(slope)), 0.0) * torch.where(z > 0, 1.0, slope if act else 1.0)
    xhat = (xd - mean) / sigma
    ag = g.abs()
    m_dx = scale.abs() * (ag.amax(dims, keepdim=True) + ag.mean(dims, keepdim=True)
                          + xhat.abs().amax(dims, keepdim=True) * (ag * xhat.abs()).mean(dims, keepdim=True))
    near_zero = z.abs() <= k * gain * m_y  # act' may differ here between the sides
    bad_dx = ((dx.double() - dx_r.double()).abs() > k * m_dx) & ~near_zero
    assert not bad_dx.any(), "dx"
    m_dw = (r * (ag * xhat.abs()).sum(dims, keepdim=True) + d.abs() * ag.sum(dims, keepdim=True)).flatten()
    assert ((dw.double() - dw_r.double()).abs() <= k * m_dw + 1e-30).all(), "dweight"
    assert ((db.double() - db_r.double()).abs() <= k * ag.sum(dims) + 1e-30).all(), "dbias"
    assert not near_zero.any() or near_zero.double().mean() < 1e-3


# ---------------------------------------------------------------------------------------------
# Argument checks: ValueError / TypeError naming the value; nothing written

BAD_BLOCK_ARGS = [
    (dict(act=3), ValueError, r"activation must be 0 \(identity\), 1 \(relu\) or 2 \(leaky_relu\), got 3"),
    (dict(act=-1), ValueError, r"activation .* got -1"),
    (dict(p=1.0), ValueError, r"dropout must lie in \[0, 1\), got 1"),
    (dict(p=-0.1), ValueError, r"dropout must lie in \[0, 1\), got -0.1"),
    (dict(rng=torch.tensor([1.0, 2.0])), TypeError, r"rng must be an int64 tensor .*got Float"),
    (dict(rng=torch.tensor([1, 2, 3])), ValueError, r"rng must have shape \(2,\).*\[3\]"),
    (dict(rng=torch.tensor([[1, 2]])), ValueError, r"rng must have shape \(2,\).*\[1, 2\]"),
    (dict(rng=torch.tensor([-1, 2])), ValueError, r"must be >= 0, got \(-1, 2\)"),
]


def _raw_call(op, x, w, b, state, dy, stats, act=2, p=0.2, rng=None):
    rng = torch.tensor([1, 2]) if rng is None else rng
    if op == "forward":
        return OPS.batch_renorm_act_forward(x, w, b, *state, True, 0.01, 1e-3, RMAX_SCHEDULE.as_list(),
                                            DMAX_SCHEDULE.as_list(), act, 0.1, p, rng)
    return OPS.batch_renorm_act_backward(dy, x, w, stats, True, act, 0.1, p, rng)


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("kwargs,error,pattern", BAD_BLOCK_ARGS, ids=lambda v: str(v)[:40])
def test_bad_block_arguments_raise_and_write_nothing(op, kwargs, error, pattern):
    x = _input((2, 3, 4, 5))
    w, b, state = _params(3)
    _, stats = _forward(x, w, b, [t.clone() for t in state])
    before = [t.clone() for t in (*state, stats)]
    with pytest.raises(error, match=pattern):
        _raw_call(op, x, w, b, state, torch.randn(2, 3, 4, 5), stats, **kwargs)
    assert all(torch.equal(a, e) for a, e in zip((*state, stats), before)), "buffers changed"


def test_backward_refuses_dy_of_another_shape():
    x = _input((2, 3, 4, 5))
    w, b, state = _params(3)
    _, stats = _forward(x, w, b, state)
    with pytest.raises(ValueError, match=r"dy has shape \[2, 3, 4, 4\] but x has \[2, 3, 4, 5\]"):
        _backward(torch.randn(2, 3, 4, 4), x, w, stats)


def test_rng_is_read_not_written():
    x = _input((2, 3, 4, 5))
    w, b, state = _params(3)
    rng = torch.tensor([2 ** 40, 13])
    y, stats = OPS.batch_renorm_act_forward(x, w, b, *state, True, 0.01, 1e-3, RMAX_SCHEDULE.as_list(),
                                            DMAX_SCHEDULE.as_list(), 1, 0.0, 0.5, rng)
    OPS.batch_renorm_act_backward(torch.randn_like(x), x, w, stats, True, 1, 0.0, 0.5, rng)
    assert rng.tolist() == [2 ** 40, 13]
    assert (y == 0).any() and (y > 0).any()
