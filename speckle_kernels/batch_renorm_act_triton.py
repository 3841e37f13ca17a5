"""The norm block y = dropout(act(batch_renorm(x))) in Triton: one element kernel, its
launchers, the torch.library ops with their autograd (the contract: batch_renorm_act_contract.py).

BatchRenorm's statistics pass and both finalize kernels are batch_renorm_triton.py's (its public
launchers, not copied); what is new is the element pass, in three modes of one kernel:

    forward   z = ((x - pivot) - offset)*scale + shift            (the rows of the stats)
              y = keep ? act(z)*keep_scale : 0                      one read of x, one write
    sums      g = (keep ? dy*keep_scale : 0) * act'(z),  u = (x - pivot) - offset
              per channel S(g), S(g*u) -> the (2, P, C) fp64 partials that
              batch_renorm_triton's backward finalize turns into dweight, dbias, A, B, mean_g
    dx        dx = u*B + (g - mean_g)*A                              g recomputed, not stored

act(z) = z > 0 ? z : z*slope (identity slope 1, relu 0, leaky_relu negative_slope), act'(z) the
same slope; dropout only when training and p > 0, keep_scale = float32(1/(1-p)). Nothing but x,
weight, the stats and the rng tensor is saved: the backward regenerates the mask and z, so the
block costs BatchRenorm's traffic and no mask or pre-activation tensor.

The mask stream (batch_renorm_act_contract.py): the element of row-major logical index j has
e = offset + j; Philox4x32-10 of counter (q lo, q hi, 0, STREAM_DROPOUT), q = e >> 2, key seed,
gives four words, e takes word e & 3, kept iff uniform(word) >= float32(p). seed and offset are
read from the int64 rng tensor (2,) on the device: no host sync, CUDA-graph capturable.

Tiles: x is viewed as (N, L, C) (L = the spatial size) with strides (s_n, s_l, s_c), for both
layouts; a tile is one n, BLOCK_I consecutive l and BLOCK_C channels, l along the contiguous
axis (last axis contiguous, first axis channels_last) as triton_common.py says. Along l the
logical index is consecutive, so e = base_e(n, c) + l. Two ways to draw the mask:
  - per element (QUADS off): one Philox call per element, keeping word e & 3. ~100 integer ops
    an element: a bf16 block (4 bytes an element of traffic) is then compute-bound on a GPU.
  - per quad (QUADS on): each (n, c) row's tiles are shifted by s = base_e & 3 so that every
    tile starts on a multiple of 4 in e (l runs from l0 - s); one Philox call gives the four
    words of four consecutive elements, interleaved into the tile by tl.join and tl.reshape.
    A quarter of the Philox work; the price is loads of unknown alignment (no 128-bit vectors)
    and a tile more per row. The host takes it when L >= QUAD_MIN_L.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import triton_common as tc
from ._backend import HAS_TRITON
from .batch_renorm_act_contract import keep_scale, negative_side_slope
from .batch_renorm_contract import N_GRADS, kernel_input
from .batch_renorm_triton import (backward_finalize, batch_renorm_statistics, batch_renorm_triton_statistics,
                                  normalize_grads)
from .schedules import RenormSchedule

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import (DROPOUT_STREAM, ROW_GRAD_A, ROW_GRAD_B, ROW_GRAD_MEAN_DY, ROW_MEAN_OFFSET,
                                ROW_PIVOT, ROW_SCALE, ROW_SHIFT, per_channel, tile_sum, uniform)

MODE_FORWARD, MODE_SUMS, MODE_DX = range(3)
QUAD_MIN_L = 8      # shorter rows waste most of a shifted tile: one Philox call an element there

if HAS_TRITON:
    @triton.jit
    def _along_l(v, CHANNELS_LAST: tl.constexpr):
        # a (BLOCK_I,) vector laid along the tile's l axis
        if CHANNELS_LAST:
            out = v[:, None]
        else:
            out = v[None, :]
        return out

    @triton.jit
    def block_offsets(n, l, ch, s_n, s_l, s_c, INDEX_64: tl.constexpr):
        # element offsets of (n, l, c); INDEX_64 widens each index before it meets its stride
        if INDEX_64:
            offs = n.to(tl.int64) * s_n + l.to(tl.int64) * s_l + ch.to(tl.int64) * s_c
        else:
            offs = n * s_n + l * s_l + ch * s_c
        return offs

    @triton.jit
    def _mask_words(q):
        # The four Philox words of quad counters q (int64 >= 0); the key is bound by the caller.
        lo = q.to(tl.uint32)  # truncates to the low word
        hi = (q >> 32).to(tl.uint32)
        return lo, hi, lo * 0, lo * 0 + DROPOUT_STREAM

    @triton.jit
    def _keep_per_element(seed, e, p):
        # One Philox call per element, keeping word e & 3.
        c0, c1, c2, c3 = _mask_words(e >> 2)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
        sel = e & 3
        word = tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))
        return uniform(word) >= p

    @triton.jit
    def _keep_per_quad(seed, q0, p, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_I: tl.constexpr):
        # q0: (BLOCK_C,) int64, the first quad of each channel's row in this tile. One Philox call
        # a quad; join(join(w0, w2), join(w1, w3)) is (.., 2, 2) holding w0 w1 w2 w3 in row-major
        # order, so the reshape puts word k & 3 of quad k >> 2 at position k.
        q = q0[:, None] + tl.arange(0, BLOCK_I // 4)[None, :]
        c0, c1, c2, c3 = _mask_words(q)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_C, BLOCK_I))
        u = uniform(words)
        if CHANNELS_LAST:
            u = tl.trans(u)
        return u >= p

    @triton.jit
    def _block_tile(t, c1, x_ptr, dy_ptr, stats_ptr, rng_ptr, C, L, n_l_blocks, s_n, s_l, s_c,
                    p, keep_scale, slope,
                    MODE: tl.constexpr, DROPOUT: tl.constexpr, QUADS: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
        # Tile t (one n, a block of l) for channels c1: its offsets and mask, u = (x - pivot) -
        # offset (0 where masked) and v: forward y, backward g (0 where masked).
        cmask = c1 < C
        n = t // n_l_blocks
        l0 = t - n * n_l_blocks
        if INDEX_64:  # l0 * BLOCK_I and the element offsets in int64 (block_offsets)
            l0 = l0.to(tl.int64)
        l0 = l0 * BLOCK_I
        ch = per_channel(c1, CHANNELS_LAST)
        k = _along_l(tl.arange(0, BLOCK_I), CHANNELS_LAST)
        if DROPOUT:
            seed = tl.load(rng_ptr)
            # e of element (n, c, l = 0): the logical index is n*C*L + c*L + l in both layouts
            base_e = tl.load(rng_ptr + 1) + (n.to(tl.int64) * C + c1.to(tl.int64)) * L
            if QUADS:
                shift = (base_e & 3).to(tl.int32)       # row start in e, past a multiple of 4
                keep = _keep_per_quad(seed, (base_e - shift + l0) >> 2, p, CHANNELS_LAST,
                                      BLOCK_C, BLOCK_I)
                l = l0 + k - per_channel(shift, CHANNELS_LAST)
            else:
                l = l0 + k
                keep = _keep_per_element(seed, per_channel(base_e, CHANNELS_LAST) + l, p)
        else:
            l = l0 + k
        m = (l >= 0) & (l < L) & (ch < C)
        offs = block_offsets(n, l, ch, s_n, s_l, s_c, INDEX_64)
        pivot = per_channel(tl.load(stats_ptr + ROW_PIVOT * C + c1, mask=cmask, other=0.0), CHANNELS_LAST)
        offset = per_channel(tl.load(stats_ptr + ROW_MEAN_OFFSET * C + c1, mask=cmask, other=0.0),
                              CHANNELS_LAST)
        scale = per_channel(tl.load(stats_ptr + ROW_SCALE * C + c1, mask=cmask, other=0.0), CHANNELS_LAST)
        shift_z = per_channel(tl.load(stats_ptr + ROW_SHIFT * C + c1, mask=cmask, other=0.0),
                               CHANNELS_LAST)
        # centre first, as batch_renorm_triton's affine: exact for data far from zero
        u = tl.where(m, (tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - pivot) - offset, 0.0)
        z = u * scale + shift_z
        if MODE == 0:
            v = tl.where(z > 0.0, z, z * slope)
            if DROPOUT:
                v = tl.where(keep, v * keep_scale, 0.0)
        else:
            v = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if DROPOUT:
                v = tl.where(keep, v * keep_scale, 0.0)
            v = tl.where(z > 0.0, v, v * slope)
        return offs, m, u, v

    @triton.jit(do_not_specialize=["n_l_blocks", "n_tiles", "tiles_per_program"])  # loop shape only
    def batch_renorm_act_kernel(
        x_ptr, dy_ptr, out_ptr,  # (N, L, C) strided, one set of strides; out: y (forward) or dx
        stats_ptr,    # (8, C) fp32, batch_renorm_triton's STAT_* rows
        grads_ptr,    # (5, C) fp32 GRAD_* rows (MODE_DX)
        partial_ptr,  # (2, P, C) fp64 out: S(g), S(g*u) per program (MODE_SUMS)
        rng_ptr,      # (2,) int64: seed, offset
        C, L, n_l_blocks, n_tiles, tiles_per_program,
        s_n, s_l, s_c,
        p, keep_scale, slope,
        MODE: tl.constexpr, DROPOUT: tl.constexpr, QUADS: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # MODE 0 forward y, 1 backward sums, 2 backward dx (module header). The element modes take
        # one tile a program; the sums walk tiles_per_program tiles, each tile's fp32 tree added
        # in fp64 (batch_renorm_triton's _channel_sums_kernel does the same for plain dy).
        pid = tl.program_id(0)
        c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if MODE == 1:
            acc_g = tl.zeros([BLOCK_C], tl.float64)
            acc_gu = tl.zeros([BLOCK_C], tl.float64)
            t_start = pid * tiles_per_program
            for t in range(t_start, tl.minimum(t_start + tiles_per_program, n_tiles)):
                _, _, u, g = _block_tile(t, c1, x_ptr, dy_ptr, stats_ptr, rng_ptr, C, L, n_l_blocks,
                                         s_n, s_l, s_c, p, keep_scale, slope, MODE, DROPOUT, QUADS,
                                         CHANNELS_LAST, INDEX_64, BLOCK_C, BLOCK_I)
                acc_g += tile_sum(g, CHANNELS_LAST)
                acc_gu += tile_sum(g * u, CHANNELS_LAST)
            cmask = c1 < C
            tl.store(partial_ptr + pid * C + c1, acc_g, mask=cmask)
            tl.store(partial_ptr + (tl.num_programs(0) + pid) * C + c1, acc_gu, mask=cmask)
        else:
            offs, m, u, v = _block_tile(pid, c1, x_ptr, dy_ptr, stats_ptr, rng_ptr, C, L, n_l_blocks,
                                        s_n, s_l, s_c, p, keep_scale, slope, MODE, DROPOUT, QUADS,
                                        CHANNELS_LAST, INDEX_64, BLOCK_C, BLOCK_I)
            if MODE == 2:
                cmask = c1 < C
                coef_b = tl.load(grads_ptr + ROW_GRAD_B * C + c1, mask=cmask, other=0.0)
                coef_a = tl.load(grads_ptr + ROW_GRAD_A * C + c1, mask=cmask, other=0.0)
                mean_g = tl.load(grads_ptr + ROW_GRAD_MEAN_DY * C + c1, mask=cmask, other=0.0)
                v = u * per_channel(coef_b, CHANNELS_LAST) + \
                    (v - per_channel(mean_g, CHANNELS_LAST)) * per_channel(coef_a, CHANNELS_LAST)
            tl.store(out_ptr + offs, v, mask=m)


# ----------------------------------------------------------------------------- host side

class _BlockLayout:
    """x (as kernel_input gives it) viewed as (N, L, C) with element strides, and its tiles."""

    def __init__(self, x: torch.Tensor, quads: bool):
        self.tensor = x = kernel_input(x)
        n, c = x.shape[0], x.shape[1]
        L = x.numel() // max(n * c, 1)
        self.C, self.L = c, L
        self.channels_last = not x.is_contiguous()  # kernel_input: channels_last(_3d) dense
        self.strides = (c * L, c, 1) if self.channels_last else (c * L, 1, L)
        self.quads = quads and L >= QUAD_MIN_L
        span = L + 3 if self.quads else L     # shifted rows reach 3 tiles' positions further
        if self.channels_last:
            self.block_c = min(tc.next_power_of_2(c), 128)
            self.block_i = min(max(tc.TILE_ELEMENTS // self.block_c, 4), tc.next_power_of_2(span))
        else:
            self.block_i = min(tc.next_power_of_2(span), tc.TILE_ELEMENTS)
            self.block_c = min(max(tc.TILE_ELEMENTS // self.block_i, 1), tc.next_power_of_2(c))
        if self.quads:
            self.block_i = max(self.block_i, 4)
        self.n_l_blocks = tc.cdiv(span, self.block_i)
        self.n_tiles = n * self.n_l_blocks
        self.c_blocks = tc.cdiv(c, self.block_c)
        s_n, s_l, s_c = self.strides
        self.index_64 = tc.needs_index_64((n - 1, s_n), (self.n_l_blocks * self.block_i - 1, s_l),
                                          (self.c_blocks * self.block_c - 1, s_c))

    def launch(self, mode, x, dy, out, stats, grads, partial, rng, *, programs, tiles_per_program,
               dropout, keep_scale, slope):
        batch_renorm_act_kernel[(programs, self.c_blocks)](
            x, dy if dy is not None else x, out if out is not None else x, stats,
            grads if grads is not None else stats, partial if partial is not None else stats, rng,
            self.C, self.L, self.n_l_blocks, self.n_tiles, tiles_per_program, *self.strides,
            float(dropout), float(keep_scale), float(slope),
            MODE=mode, DROPOUT=dropout > 0.0, QUADS=self.quads and dropout > 0.0,
            CHANNELS_LAST=self.channels_last, INDEX_64=self.index_64,
            BLOCK_C=self.block_c, BLOCK_I=self.block_i,
            num_warps=tc.SUMS_NUM_WARPS if mode == MODE_SUMS else tc.AFFINE_NUM_WARPS)


def _active_dropout(training: bool, dropout: float) -> float:
    return float(dropout) if training and dropout > 0.0 else 0.0


def block_forward(x, stats, rng, *, training: bool, slope: float, dropout: float, quads: bool = True):
    """y = dropout(act(z)) with z the affine of the stats rows."""
    p = _active_dropout(training, dropout)
    layout = _BlockLayout(x, quads)
    y = torch.empty_like(layout.tensor)
    layout.launch(MODE_FORWARD, layout.tensor, None, y, stats, None, None, rng, programs=layout.n_tiles,
                  tiles_per_program=1, dropout=p, keep_scale=keep_scale(p), slope=slope)
    return y


def block_backward(dy, x, weight, stats, rng, *, training: bool, slope: float, dropout: float,
                   quads: bool = True):
    """(dx, grads): grads the (5, C) fp32 rows GRAD_* of batch_renorm_triton."""
    p = _active_dropout(training, dropout)
    layout = _BlockLayout(x, quads)
    x = layout.tensor
    dy = dy if dy.stride() == x.stride() else torch.empty_like(x).copy_(dy)
    common = dict(dropout=p, keep_scale=keep_scale(p), slope=slope)
    programs, tiles_per_program = tc.programs_for_reduction(layout.n_tiles, layout.c_blocks, x.device)
    partial = torch.empty((2, programs, layout.C), device=x.device, dtype=torch.float64)
    layout.launch(MODE_SUMS, x, dy, None, stats, None, partial, rng, programs=programs,
                  tiles_per_program=tiles_per_program, **common)
    grads = backward_finalize(partial, weight, stats, x.numel() // layout.C, training=training)
    dx = torch.empty_like(x)
    layout.launch(MODE_DX, x, dy, dx, stats, grads, None, rng, programs=layout.n_tiles,
                  tiles_per_program=1, **common)
    return dx, grads


# The block's ops: batch_renorm_triton's statistics op (mutates the running buffers, no
# gradient), then the element pass, whose backward holds the whole gradient. Eager calls skip
# torch.library's ~100 us of host time a call through _EagerBlock, as batch_renorm_triton does.
@torch.library.custom_op("speckle_kernels::batch_renorm_act_triton_forward", mutates_args=())
def batch_renorm_act_triton_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                    stats: torch.Tensor, training: bool, slope: float, dropout: float,
                                    rng: torch.Tensor) -> torch.Tensor:
    """y = dropout(act(z)); weight and bias are folded into the stats already and are inputs only
    so that autograd routes their gradients here. slope: act'(z) where z <= 0."""
    return block_forward(x, stats, rng, training=training, slope=slope, dropout=dropout)


@batch_renorm_act_triton_forward.register_fake
def _(x, weight, bias, stats, training, slope, dropout, rng):
    return torch.empty_like(kernel_input(x))


@torch.library.custom_op("speckle_kernels::batch_renorm_act_triton_backward", mutates_args=())
def batch_renorm_act_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                     stats: torch.Tensor, training: bool, slope: float, dropout: float,
                                     rng: torch.Tensor) -> List[torch.Tensor]:
    """[dx, grads]: grads the (5, C) fp32 rows GRAD_* (dweight, dbias first)."""
    return list(block_backward(dy, x, weight, stats, rng, training=training, slope=slope, dropout=dropout))


@batch_renorm_act_triton_backward.register_fake
def _(dy, x, weight, stats, training, slope, dropout, rng):
    return [torch.empty_like(kernel_input(x)), x.new_empty((N_GRADS, x.shape[1]), dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stats, training, slope, dropout, rng = inputs
    ctx.save_for_backward(x, weight, stats, rng)  # normalize_grads reads the first three
    ctx.training, ctx.slope, ctx.dropout, ctx.has_bias = training, slope, dropout, bias is not None


def _block_grads(ctx, dy, backward):
    saved = ctx.saved_tensors  # once: a non-reentrant checkpoint unpacks each saved tensor once
    grads = normalize_grads(ctx, dy, lambda dy, x, weight, stats, training: backward(
        dy, x, weight, stats, training, ctx.slope, ctx.dropout, saved[3]), saved)
    return grads + (None, None, None)  # slope, dropout, rng


batch_renorm_act_triton_forward.register_autograd(
    lambda ctx, dy: _block_grads(ctx, dy, batch_renorm_act_triton_backward), setup_context=_setup_context)


def _eager_backward(dy, x, weight, stats, training, slope, dropout, rng):
    return block_backward(dy, x, weight, stats, rng, training=training, slope=slope, dropout=dropout)


class _EagerBlock(torch.autograd.Function):
    """The forward op's eager twin (same functions, a plain autograd.Function)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats, training, slope, dropout, rng):
        _setup_context(ctx, (x, weight, bias, stats, training, slope, dropout, rng), None)
        return block_forward(x, stats, rng, training=training, slope=slope, dropout=dropout)

    @staticmethod
    def backward(ctx, dy):
        return _block_grads(ctx, dy, _eager_backward)


def batch_renorm_act(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                     training: bool, momentum: float, eps: float, r_max: RenormSchedule, d_max: RenormSchedule,
                     activation: int, negative_slope: float, dropout: float, rng: torch.Tensor) -> torch.Tensor:
    """dropout(act(batch_renorm(x))) through the Triton kernels; differentiable in x, weight and
    bias; updates the running buffers in place when training. rng (int64 (2,): seed, offset, on
    x's device) is read on the device and never modified: pass a snapshot of a changing one."""
    slope = negative_side_slope(activation, negative_slope)
    detach = (lambda t: t.detach() if t is not None else None)
    if torch.compiler.is_compiling():
        stats = batch_renorm_triton_statistics(x.detach(), detach(weight), detach(bias), running_mean,
                                               running_std, num_batches_tracked, training, float(momentum),
                                               float(eps), r_max.as_list() + d_max.as_list())
        return batch_renorm_act_triton_forward(x, weight, bias, stats, training, slope, float(dropout), rng)
    with torch.no_grad():
        stats = batch_renorm_statistics(x.detach(), detach(weight), detach(bias), running_mean,
                                        running_std, num_batches_tracked, training=training,
                                        momentum=float(momentum), eps=float(eps), r_max=r_max, d_max=d_max)
    return _EagerBlock.apply(x, weight, bias, stats, training, slope, float(dropout), rng)
