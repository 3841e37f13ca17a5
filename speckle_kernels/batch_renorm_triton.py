"""Fused batch renormalization in Triton: the kernels, their launchers, the torch.library ops
with their autograd, and the list of kernel variants compiled ahead of time in the tests.

This file is longer than the house's ~400 lines on purpose: it is the whole Triton story of one
op (as Liger-Kernel keeps an op's kernels, launchers and autograd.Function together), and its
parts share the row constants and the _Layout that a split would have to export both ways.

The function (reference.py holds the plain-torch oracle), per channel c over every other dim:

    forward   mu, sigma = mean(x), sqrt(var_biased(x)) + eps
              r = clamp(sigma/rs, 1/r_max, r_max),  d = clamp((mu-rm)/rs, -d_max, d_max)   (schedules.py)
              y = (x-mu)*scale + shift,  scale = w*r/sigma,  shift = b + w*d
              rm += m*(mu-rm), rs += m*(sigma-rs), t += 1           (all on the device)
    backward  with z = (x-mu)/sigma, s = sigma-eps, n = elements per channel:
              dx = A*(dy - mean(dy)) + B*(x-mu),  A = w*r/sigma,  B = -w*r*sum(dy*z)/(n*s*sigma),
              dweight = r*sum(dy*z) + d*sum(dy),  dbias = sum(dy)
              (dy - mean(dy)) is formed first: with one value per channel dx is then exactly 0)

Memory traffic is the whole cost, so the work is three passes in forward (read x for the
statistics, read x + write y) and three in backward (read x, dy for the sums, read both again
+ write dx), plus tiny per-channel kernels. The per-channel reduction is split over many
programs (partials in a (3, P, C) fp64 buffer, merged by a second kernel): one program per
channel starves the GPU at U-Net's high-resolution layers (C=64, 524288 values per channel).
Statistics: u = x - pivot (the channel's first element), so that x - pivot is exact for data
like 1e4 + 1e-2*randn; each tile's (count, mean, M2) of u is two-pass in registers, and tiles
and programs merge by Chan's formula in fp64. Sums of squares about a far-off pivot would lose
a factor 1 + (mean - pivot)^2/var of precision; this keeps two-pass accuracy with one read of
x. The backward's sums are fp32 trees per tile added in fp64. Errors are judged against the same
function in float64 (speckle_kernels/testing/batch_renorm.py): at most 2x the fp32 reference's + 1 ulp.

Layouts: x is viewed as (outer, inner, C) with strides (s_o, s_i, s_c) and no copy:
contiguous NC* is (N, L, C) with s_i = 1; channels_last is (1, N*L, C) with s_c = 1. Tiles keep
the contiguous dimension last so loads coalesce. Anything else is copied to contiguous first.
Nothing here synchronizes with the host: r, d, r_max, d_max and the running statistics live
on the device, so the layer can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ._backend import HAS_TRITON, kernel_input
from .schedules import RenormSchedule

if HAS_TRITON:
    import triton
    import triton.language as tl

# Rows of the per-channel fp32 tensors passed between kernels.
# The batch mean is kept as pivot + offset: x - pivot is exact for x near the pivot, so the
# centred values keep their precision even where fp32 cannot hold the mean itself finely.
STAT_PIVOT, STAT_MEAN_OFFSET, STAT_SIGMA, STAT_R, STAT_D, STAT_INV_S, STAT_SCALE, STAT_SHIFT = range(8)
GRAD_WEIGHT, GRAD_BIAS, GRAD_A, GRAD_B, GRAD_MEAN_DY = range(5)
N_STATS, N_GRADS = 8, 5
TILE_ELEMENTS = 2048  # per tile: 16 fp32 values a thread at 4 warps; enough bytes in flight
SUMS_NUM_WARPS = 4
AFFINE_NUM_WARPS = 4
REDUCTION_PROGRAMS_PER_SM = 8  # programs along the reduction: a few waves of the GPU
# Channels-last input has one channel block, so its reduction splits into ~8 partials a
# multiprocessor (P ~ 1000): the merge loop is latency-bound, so it walks 128 partials a step
# over 16 channels a program (at 64 x 32 it cost ~35 us an H100, a fifth of the forward).
FINALIZE_BLOCK_C = 16
FINALIZE_BLOCK_P = 128

if HAS_TRITON:
    # Kernels may only read globals that are tl.constexpr; the host indexes with the ints above.
    _STAT_PIVOT = tl.constexpr(STAT_PIVOT)
    _STAT_MEAN_OFFSET = tl.constexpr(STAT_MEAN_OFFSET)
    _STAT_SIGMA = tl.constexpr(STAT_SIGMA)
    _STAT_R = tl.constexpr(STAT_R)
    _STAT_D = tl.constexpr(STAT_D)
    _STAT_INV_S = tl.constexpr(STAT_INV_S)
    _STAT_SCALE = tl.constexpr(STAT_SCALE)
    _STAT_SHIFT = tl.constexpr(STAT_SHIFT)
    _GRAD_WEIGHT = tl.constexpr(GRAD_WEIGHT)
    _GRAD_BIAS = tl.constexpr(GRAD_BIAS)
    _GRAD_A = tl.constexpr(GRAD_A)
    _GRAD_B = tl.constexpr(GRAD_B)
    _GRAD_MEAN_DY = tl.constexpr(GRAD_MEAN_DY)

    @triton.jit
    def _per_channel(v, CHANNELS_LAST: tl.constexpr):
        # a (BLOCK_C,) per-channel vector laid along the tile's channel axis
        if CHANNELS_LAST:
            out = v[None, :]
        else:
            out = v[:, None]
        return out

    @triton.jit
    def _tile(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c,
              CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_I: tl.constexpr):
        # Offsets and mask of tile t (outer index o, inner block) for channels c1. The contiguous
        # dimension is the tile's last axis: (BLOCK_I, BLOCK_C) channels_last, else (BLOCK_C, BLOCK_I).
        o = t // n_inner_blocks
        ii = (t - o * n_inner_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
        ch = _per_channel(c1, CHANNELS_LAST)
        if CHANNELS_LAST:
            idx = ii[:, None]
        else:
            idx = ii[None, :]
        if INDEX_64:
            o = o.to(tl.int64)
            ch = ch.to(tl.int64)
        return o * s_o + idx * s_i + ch * s_c, (ch < C) & (idx < INNER)

    @triton.jit
    def _tile_sum(v, CHANNELS_LAST: tl.constexpr):
        # Per-channel fp64 sum of a tile's values. fp64 because the order of a tl.sum is not
        # ours: a tree on a GPU, but a sequential loop under the interpreter, whose fp32 error
        # on a few hundred values already passes the reference's.
        v = v.to(tl.float64)
        if CHANNELS_LAST:
            out = tl.sum(v, axis=0)
        else:
            out = tl.sum(v, axis=1)
        return out

    @triton.jit
    def _channel_sums_kernel(
        x_ptr, dy_ptr, stats_ptr, partial_ptr,  # x, dy: (outer, inner, C) strided; partial: (3, P, C) fp64
        C, INNER, n_inner_blocks, n_tiles, tiles_per_program,
        s_o, s_i, s_c,
        BACKWARD: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # Forward: per channel (count, mean, M2) of u = x - pivot. Each tile's are two-pass, in
        # registers (its mean, then the squares about it), and tiles merge by Chan's formula in
        # fp64: one read of x, two-pass accuracy wherever the pivot sits in the data.
        # Backward: per channel sums of dy and dy*u, u = (x - pivot) - offset (the finalize divides
        # by sigma once, in fp64: a rounded 1/sigma in every term would bias them all alike), each
        # tile's (a tree in fp32) added in fp64.  One partial per program; merged by a finalize.
        p = tl.program_id(0)
        c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        if BACKWARD:
            shift = tl.load(stats_ptr + _STAT_PIVOT * C + c1, mask=cmask, other=0.0)
            offset = tl.load(stats_ptr + _STAT_MEAN_OFFSET * C + c1, mask=cmask, other=0.0)
        else:
            shift = tl.load(x_ptr + c1 * s_c, mask=cmask, other=0.0).to(tl.float32)
            offset = tl.zeros([BLOCK_C], tl.float32)
        shift2 = _per_channel(shift, CHANNELS_LAST)
        offset2 = _per_channel(offset, CHANNELS_LAST)
        acc_n = tl.zeros([BLOCK_C], tl.float64)   # forward: count; backward: sum of dy
        acc_a = tl.zeros([BLOCK_C], tl.float64)   # forward: mean;  backward: sum of dy*z
        acc_b = tl.zeros([BLOCK_C], tl.float64)   # forward: M2
        t_start = p * tiles_per_program
        t_end = tl.minimum(t_start + tiles_per_program, n_tiles)
        for t in range(t_start, t_end):
            offs, m = _tile(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c,
                            CHANNELS_LAST, INDEX_64, BLOCK_I)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.where(m, (x - shift2) - offset2, 0.0)
            if BACKWARD:
                dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
                acc_n += _tile_sum(dy, CHANNELS_LAST)
                acc_a += _tile_sum(dy * u, CHANNELS_LAST)
            else:
                n_b = _tile_sum(m.to(tl.float32), CHANNELS_LAST)
                tile_mean = _tile_sum(u, CHANNELS_LAST) / tl.maximum(n_b, 1.0)
                dev = tl.where(m, u - _per_channel(tile_mean.to(tl.float32), CHANNELS_LAST), 0.0)
                tile_m2 = _tile_sum(dev * dev, CHANNELS_LAST)
                n_ab = acc_n + n_b
                w_b = n_b / tl.maximum(n_ab, 1.0)
                delta = tile_mean - acc_a
                acc_a += delta * w_b
                acc_b += tile_m2 + delta * delta * acc_n * w_b
                acc_n = n_ab
        n_programs = tl.num_programs(0)
        tl.store(partial_ptr + p * C + c1, acc_n, mask=cmask)
        tl.store(partial_ptr + (n_programs + p) * C + c1, acc_a, mask=cmask)
        if not BACKWARD:
            tl.store(partial_ptr + (2 * n_programs + p) * C + c1, acc_b, mask=cmask)

    @triton.jit
    def _per_channel_affine_kernel(
        x_ptr, dy_ptr, out_ptr,  # (outer, inner, C) strided, all three with the same strides
        pivot_ptr, offset_ptr, coef_x_ptr, coef_dy_ptr, coef_0_ptr,  # (C,) fp32
        C, INNER, n_inner_blocks,
        s_o, s_i, s_c,
        HAS_DY: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # forward:  y  = (x - pivot[c] - offset[c])*coef_x[c] + coef_0[c]
        # backward: dx = (x - pivot[c] - offset[c])*coef_x[c] + (dy - coef_0[c])*coef_dy[c]
        # Centring comes first: folding it into one FMA (x*a + b) loses all precision when the
        # mean dwarfs the spread. In backward coef_0 is mean(dy): with one value per channel both
        # terms are exactly 0, as the true gradient is.  One tile a program.
        t = tl.program_id(0)
        c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        pivot = tl.load(pivot_ptr + c1, mask=cmask, other=0.0)
        offset = tl.load(offset_ptr + c1, mask=cmask, other=0.0)
        cx = tl.load(coef_x_ptr + c1, mask=cmask, other=0.0)
        c0 = tl.load(coef_0_ptr + c1, mask=cmask, other=0.0)
        cdy = tl.load(coef_dy_ptr + c1, mask=cmask, other=0.0)
        offs, m = _tile(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c, CHANNELS_LAST, INDEX_64, BLOCK_I)
        pivot2 = _per_channel(pivot, CHANNELS_LAST)
        offset2 = _per_channel(offset, CHANNELS_LAST)
        cx2 = _per_channel(cx, CHANNELS_LAST)
        c02 = _per_channel(c0, CHANNELS_LAST)
        cdy2 = _per_channel(cdy, CHANNELS_LAST)
        out = ((tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - pivot2) - offset2) * cx2
        if HAS_DY:
            out += (tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32) - c02) * cdy2
        else:
            out += c02
        tl.store(out_ptr + offs, out, mask=m)

    @triton.jit
    def _merge_sums(partial_ptr, row, P, C, c1, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # Deterministic fp64 sum of partial row `row` ((rows, P, C) layout) for channels c1.
        total = tl.zeros([BLOCK_C], tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)[:, None]
            m = (pp < P) & cmask[None, :]
            total += tl.sum(tl.load(partial_ptr + (row * P + pp) * C + c1[None, :], mask=m, other=0.0), axis=0)
        return total

    @triton.jit
    def _merge_moments(partial_ptr, P, C, c1, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # Chan's merge of the (count, mean, M2) partials, in fp64: the mean first, then
        # M2 = sum(M2_p + n_p (mean_p - mean)^2), which cancels nothing.
        n = tl.zeros([BLOCK_C], tl.float64)
        mean = tl.zeros([BLOCK_C], tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)[:, None]
            m = (pp < P) & cmask[None, :]
            n_p = tl.load(partial_ptr + pp * C + c1[None, :], mask=m, other=0.0)
            mean_p = tl.load(partial_ptr + (P + pp) * C + c1[None, :], mask=m, other=0.0)
            n += tl.sum(n_p, axis=0)
            mean += tl.sum(n_p * mean_p, axis=0)
        mean = mean / tl.maximum(n, 1.0)
        m2 = tl.zeros([BLOCK_C], tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)[:, None]
            m = (pp < P) & cmask[None, :]
            n_p = tl.load(partial_ptr + pp * C + c1[None, :], mask=m, other=0.0)
            mean_p = tl.load(partial_ptr + (P + pp) * C + c1[None, :], mask=m, other=0.0)
            m2_p = tl.load(partial_ptr + (2 * P + pp) * C + c1[None, :], mask=m, other=0.0)
            delta = mean_p - mean[None, :]
            m2 += tl.sum(m2_p + n_p * delta * delta, axis=0)
        return n, mean, m2

    @triton.jit
    def _batch_renorm_forward_finalize_kernel(
        x_ptr, partial_ptr, weight_ptr, bias_ptr,
        running_mean_ptr, running_std_ptr, num_batches_tracked_ptr,  # (C,), (C,), () int64
        stats_ptr,  # out: (8, C) fp32, rows STAT_*
        P, C, s_c, count, eps, momentum,
        r_slope, r_start, r_low, r_high, d_slope, d_start, d_low, d_high,
        TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        rm = tl.load(running_mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        rs = tl.load(running_std_ptr + c1, mask=cmask, other=1.0).to(tl.float32)
        if TRAINING:
            n, mean_u64, m2 = _merge_moments(partial_ptr, P, C, c1, cmask, BLOCK_C, BLOCK_P)
            pivot = tl.load(x_ptr + c1 * s_c, mask=cmask, other=0.0).to(tl.float32)
            mean_u = mean_u64.to(tl.float32)
            mean = pivot + mean_u
            std_biased = tl.sqrt(m2 / tl.maximum(n, 1.0)).to(tl.float32)
            sigma = std_biased + eps
            t = tl.load(num_batches_tracked_ptr).to(tl.float32)
            r_max = tl.minimum(tl.maximum(r_slope * t + r_start, r_low), r_high)
            d_max = tl.minimum(tl.maximum(d_slope * t + d_start, d_low), d_high)
            r = tl.minimum(tl.maximum(sigma / rs, 1.0 / r_max), r_max)
            d = tl.minimum(tl.maximum((mean - rm) / rs, -d_max), d_max)
            inv_s = tl.where(std_biased > 0.0, 1.0 / tl.where(std_biased > 0.0, std_biased, 1.0), 0.0)
            tl.store(running_mean_ptr + c1, rm + momentum * (mean - rm), mask=cmask)
            offset = mean_u
            tl.store(running_std_ptr + c1, rs + momentum * (sigma - rs), mask=cmask)
        else:
            pivot = rm
            offset = tl.zeros([BLOCK_C], tl.float32)
            sigma = rs
            r = tl.full([BLOCK_C], 1.0, tl.float32)
            d = tl.zeros([BLOCK_C], tl.float32)
            inv_s = tl.zeros([BLOCK_C], tl.float32)
        # xhat = (x - mean)*a + d with a = r/sigma; y = xhat*w + b
        a = r / sigma
        shift = d
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + c1, mask=cmask, other=1.0).to(tl.float32)
            a = a * w
            shift = shift * w
        if HAS_BIAS:
            shift += tl.load(bias_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        tl.store(stats_ptr + _STAT_PIVOT * C + c1, pivot, mask=cmask)
        tl.store(stats_ptr + _STAT_MEAN_OFFSET * C + c1, offset, mask=cmask)
        tl.store(stats_ptr + _STAT_SIGMA * C + c1, sigma, mask=cmask)
        tl.store(stats_ptr + _STAT_R * C + c1, r, mask=cmask)
        tl.store(stats_ptr + _STAT_D * C + c1, d, mask=cmask)
        tl.store(stats_ptr + _STAT_INV_S * C + c1, inv_s, mask=cmask)
        tl.store(stats_ptr + _STAT_SCALE * C + c1, a, mask=cmask)
        tl.store(stats_ptr + _STAT_SHIFT * C + c1, shift, mask=cmask)

    @triton.jit
    def _batch_renorm_backward_finalize_kernel(
        partial_ptr, weight_ptr, stats_ptr,  # partial: (3, P, C) fp64, rows sum dy, sum dy*z; stats: (8, C)
        grads_ptr,  # out: (5, C) fp32, rows GRAD_*
        P, C, count,
        TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        sum_dy = _merge_sums(partial_ptr, 0, P, C, c1, cmask, BLOCK_C, BLOCK_P)
        sum_dyz = _merge_sums(partial_ptr, 1, P, C, c1, cmask, BLOCK_C, BLOCK_P)  # S(dy*u) for now
        sigma = tl.load(stats_ptr + _STAT_SIGMA * C + c1, mask=cmask, other=1.0)
        r = tl.load(stats_ptr + _STAT_R * C + c1, mask=cmask, other=0.0)
        d = tl.load(stats_ptr + _STAT_D * C + c1, mask=cmask, other=0.0)
        inv_s = tl.load(stats_ptr + _STAT_INV_S * C + c1, mask=cmask, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        coef_a = w * r / sigma
        sum_dyz = sum_dyz / sigma.to(tl.float64)  # S(dy*u) -> S(dy*z)
        if TRAINING:
            coef_b = (-coef_a.to(tl.float64) * sum_dyz * inv_s.to(tl.float64) / count).to(tl.float32)
            mean_dy = (sum_dy / count).to(tl.float32)
        else:
            coef_b = tl.zeros([BLOCK_C], tl.float32)
            mean_dy = tl.zeros([BLOCK_C], tl.float32)
        dweight = r.to(tl.float64) * sum_dyz + d.to(tl.float64) * sum_dy
        tl.store(grads_ptr + _GRAD_WEIGHT * C + c1, dweight.to(tl.float32), mask=cmask)
        tl.store(grads_ptr + _GRAD_BIAS * C + c1, sum_dy.to(tl.float32), mask=cmask)
        tl.store(grads_ptr + _GRAD_A * C + c1, coef_a, mask=cmask)
        tl.store(grads_ptr + _GRAD_B * C + c1, coef_b, mask=cmask)
        tl.store(grads_ptr + _GRAD_MEAN_DY * C + c1, mean_dy, mask=cmask)


# ----------------------------------------------------------------------------- host side

def _cdiv(a: int, b: int) -> int:
    # triton.cdiv and triton.next_power_of_2 go through Triton's constexpr wrappers: several
    # microseconds a call, on a path where the host's time per layer is the budget.
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Layout:
    """x viewed as (outer, inner, C) with element strides, and the tile shape that suits it."""

    def __init__(self, x: torch.Tensor):
        self.tensor = x = kernel_input(x)
        n, c = x.shape[0], x.shape[1]
        inner = x.numel() // max(n * c, 1)
        # (N, C) input is a (rows, C) matrix: the channels_last path reads it best.
        self.channels_last = inner == 1 or not x.is_contiguous()
        if self.channels_last:
            self.outer, self.inner, self.strides = 1, n * inner, (0, c, 1)
        else:
            self.outer, self.inner, self.strides = n, inner, (c * inner, 1, inner)
        self.C = c
        if self.channels_last:
            self.block_c = min(_next_power_of_2(c), 128)
            self.block_i = min(max(TILE_ELEMENTS // self.block_c, 1), _next_power_of_2(self.inner))
        else:
            self.block_i = min(_next_power_of_2(self.inner), TILE_ELEMENTS)
            self.block_c = min(max(TILE_ELEMENTS // self.block_i, 1), _next_power_of_2(c))
        self.n_inner_blocks = _cdiv(self.inner, self.block_i)
        self.n_tiles = self.outer * self.n_inner_blocks
        self.c_blocks = _cdiv(c, self.block_c)
        self.index_64 = self.tensor.numel() >= 2**31 - TILE_ELEMENTS

    def match(self, t: torch.Tensor) -> torch.Tensor:
        """t (same shape as x) with x's memory layout, copying only when it differs."""
        if t.stride() == self.tensor.stride():
            return t
        return torch.empty_like(self.tensor).copy_(t)

    def launch_args(self):
        return dict(CHANNELS_LAST=self.channels_last, INDEX_64=self.index_64,
                    BLOCK_C=self.block_c, BLOCK_I=self.block_i)


def _programs_for_reduction(layout: _Layout, device: torch.device) -> tuple[int, int]:
    """(programs along the reduction, tiles each): a few waves of the GPU in all."""
    if device.type == "cuda":
        target = REDUCTION_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after the other: fewer, longer ones
        target = 4
    per_channel_block = max(1, min(layout.n_tiles, _cdiv(target, layout.c_blocks)))
    tiles_per_program = _cdiv(layout.n_tiles, per_channel_block)
    return _cdiv(layout.n_tiles, tiles_per_program), tiles_per_program


def _channel_sums(layout: _Layout, dy: torch.Tensor | None, stats: torch.Tensor | None) -> torch.Tensor:
    x = layout.tensor
    programs, tiles_per_program = _programs_for_reduction(layout, x.device)
    partial = torch.empty((3, programs, layout.C), device=x.device, dtype=torch.float64)
    backward = dy is not None
    _channel_sums_kernel[(programs, layout.c_blocks)](
        x, dy if backward else x, stats if backward else partial, partial,
        layout.C, layout.inner, layout.n_inner_blocks, layout.n_tiles, tiles_per_program,
        *layout.strides, BACKWARD=backward, num_warps=SUMS_NUM_WARPS, **layout.launch_args())
    return partial


def _per_channel_affine(layout: _Layout, x, dy, stats, coef_x, coef_dy, coef_0) -> torch.Tensor:
    out = torch.empty_like(layout.tensor)
    _per_channel_affine_kernel[(layout.n_tiles, layout.c_blocks)](
        x, dy if dy is not None else x, out, stats[STAT_PIVOT], stats[STAT_MEAN_OFFSET], coef_x, coef_dy if dy is not None else coef_x,
        coef_0, layout.C, layout.inner, layout.n_inner_blocks, *layout.strides,
        HAS_DY=dy is not None, num_warps=AFFINE_NUM_WARPS, **layout.launch_args())
    return out


def batch_renorm_statistics(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                            training: bool, momentum: float, eps: float,
                            r_max: RenormSchedule, d_max: RenormSchedule) -> torch.Tensor:
    """The (8, C) fp32 rows STAT_*; updates the running buffers when training (on the device)."""
    layout = _Layout(x)
    C = layout.C
    stats = torch.empty((N_STATS, C), device=x.device, dtype=torch.float32)
    # eval reads no partials; an empty fp64 buffer keeps the kernel's one signature
    partial = _channel_sums(layout, None, None) if training else stats.new_empty((3, 0, C), dtype=torch.float64)
    _batch_renorm_forward_finalize_kernel[(_cdiv(C, FINALIZE_BLOCK_C),)](
        layout.tensor, partial, weight if weight is not None else stats,
        bias if bias is not None else stats, running_mean, running_std, num_batches_tracked, stats,
        partial.shape[1], C, layout.strides[2], float(x.numel() // C), float(eps), float(momentum),
        r_max.slope, r_max.start, r_max.low, r_max.high, d_max.slope, d_max.start, d_max.low, d_max.high,
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=FINALIZE_BLOCK_C, BLOCK_P=FINALIZE_BLOCK_P)
    if training:  # after the finalize kernel has read t: its programs must all see the same t
        num_batches_tracked.add_(1)
    return stats


def batch_renorm_normalize(layout: _Layout, stats: torch.Tensor) -> torch.Tensor:
    return _per_channel_affine(layout, layout.tensor, None, stats, stats[STAT_SCALE], None, stats[STAT_SHIFT])


def batch_renorm_backward(dy, layout: _Layout, weight, stats, *, training: bool):
    """Triton backward. Returns (dx, grads), grads the (5, C) fp32 rows GRAD_*."""
    dy = layout.match(dy)
    C = layout.C
    partial = _channel_sums(layout, dy, stats)
    grads = torch.empty((N_GRADS, C), device=dy.device, dtype=torch.float32)
    _batch_renorm_backward_finalize_kernel[(_cdiv(C, FINALIZE_BLOCK_C),)](
        partial, weight if weight is not None else stats, stats, grads,
        partial.shape[1], C, float(dy.numel() // C),
        TRAINING=training, HAS_WEIGHT=weight is not None,
        BLOCK_C=FINALIZE_BLOCK_C, BLOCK_P=FINALIZE_BLOCK_P)
    dx = _per_channel_affine(layout, layout.tensor, dy, stats, grads[GRAD_B], grads[GRAD_A],
                             grads[GRAD_MEAN_DY])
    return dx, grads


# Registered as torch ops so that torch.compile(fullgraph=True) traces through the layer (as
# opaque calls) and autograd, functionalization and CUDA graphs see normal ops. An op that
# mutates its inputs cannot carry an autograd formula, so the layer is two ops: the statistics
# (mutates the running buffers, no gradient) and the normalization, whose backward holds the
# whole gradient, including the part that flows through the batch mean and std.
@torch.library.custom_op("speckle_kernels::batch_renorm_triton_statistics",
                         mutates_args=("running_mean", "running_std", "num_batches_tracked"))
def batch_renorm_triton_statistics(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    running_mean: torch.Tensor, running_std: torch.Tensor, num_batches_tracked: torch.Tensor,
    training: bool, momentum: float, eps: float, schedule: List[float],
) -> torch.Tensor:
    """The (8, C) fp32 per-channel tensor (rows STAT_*); updates the buffers when training."""
    return batch_renorm_statistics(x, weight, bias, running_mean, running_std, num_batches_tracked,
                                   training=training, momentum=momentum, eps=eps,
                                   r_max=RenormSchedule(*schedule[:4]), d_max=RenormSchedule(*schedule[4:]))


@batch_renorm_triton_statistics.register_fake
def _(x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps, schedule):
    return x.new_empty((N_STATS, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op("speckle_kernels::batch_renorm_triton_normalize", mutates_args=())
def batch_renorm_triton_normalize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                  stats: torch.Tensor, training: bool) -> torch.Tensor:
    """y = ((x - pivot) - offset)*scale + shift with the rows of stats, where weight and bias are
    already folded in; they are inputs so that autograd routes their gradients here."""
    return batch_renorm_normalize(_Layout(x), stats)


@batch_renorm_triton_normalize.register_fake
def _(x, weight, bias, stats, training):
    return torch.empty_like(kernel_input(x))


@torch.library.custom_op("speckle_kernels::batch_renorm_triton_backward", mutates_args=())
def batch_renorm_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                 stats: torch.Tensor, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, grads): grads is (5, C) fp32 with rows GRAD_* (dweight, dbias first)."""
    return batch_renorm_backward(dy, _Layout(x), weight, stats, training=training)


@batch_renorm_triton_backward.register_fake
def _(dy, x, weight, stats, training):
    return torch.empty_like(kernel_input(x)), x.new_empty((N_GRADS, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stats, training = inputs
    ctx.save_for_backward(x, weight, stats)
    ctx.training = training
    ctx.has_bias = bias is not None


def _normalize_grads(ctx, dy, backward):
    """The normalize op's input gradients, with backward(dy, x, weight, stats, training) giving
    (dx, grads): the registered op under torch.compile, the plain function in eager mode.
    (The norm block of batch_renorm_act_triton.py saves more tensors after these three.)"""
    x, weight, stats = ctx.saved_tensors[:3]
    dx, grads = backward(dy, x, weight, stats, ctx.training)
    param_dtype = weight.dtype if weight is not None else torch.float32
    dweight = grads[GRAD_WEIGHT].to(param_dtype) if weight is not None else None
    dbias = grads[GRAD_BIAS].to(param_dtype) if ctx.has_bias else None
    return dx, dweight, dbias, None, None


def _normalize_backward(ctx, dy):
    return _normalize_grads(ctx, dy, batch_renorm_triton_backward)


batch_renorm_triton_normalize.register_autograd(_normalize_backward, setup_context=_setup_context)


class _EagerNormalize(torch.autograd.Function):
    """The normalize op's eager twin. torch.library's Python custom ops cost ~100 us of host time
    a call in eager mode (measured on an H100's host: 500 us a forward against 160 us of GPU
    work), so eager calls run the same functions through a plain autograd.Function and
    torch.compile traces the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats, training):
        _setup_context(ctx, (x, weight, bias, stats, training), None)
        return batch_renorm_normalize(_Layout(x), stats)

    @staticmethod
    def backward(ctx, dy):
        return _normalize_grads(ctx, dy, lambda dy, x, weight, stats, training: batch_renorm_backward(
            dy, _Layout(x), weight, stats, training=training))


def batch_renorm(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                 training: bool, momentum: float, eps: float,
                 r_max: RenormSchedule, d_max: RenormSchedule) -> torch.Tensor:
    """Batch renormalization through the Triton kernels; updates the running buffers in place
    when training. Under torch.compile the registered ops are traced; in eager mode the same
    functions run through _EagerNormalize (a quarter of the host time)."""
    detach = (lambda t: t.detach() if t is not None else None)
    if torch.compiler.is_compiling():
        stats = batch_renorm_triton_statistics(x.detach(), detach(weight), detach(bias), running_mean,
                                               running_std, num_batches_tracked, training, float(momentum),
                                               float(eps), r_max.as_list() + d_max.as_list())
        return batch_renorm_triton_normalize(x, weight, bias, stats, training)
    with torch.no_grad():
        stats = batch_renorm_statistics(x.detach(), detach(weight), detach(bias), running_mean,
                                        running_std, num_batches_tracked, training=training,
                                        momentum=float(momentum), eps=float(eps), r_max=r_max, d_max=d_max)
    return _EagerNormalize.apply(x, weight, bias, stats, training)


def aot_variants():
    """(kernel, signature, constexprs) for every specialization the launchers can make; the
    ahead-of-time compile test (tests/aot_compile.py) builds each for sm_80 and sm_90."""
    i32, i64, f32 = "i32", "i64", "fp32"
    variants = []
    for dtype in ("fp32", "fp16", "bf16"):
        for channels_last in (False, True):
            for index_64 in (False, True):
                layout = dict(CHANNELS_LAST=channels_last, INDEX_64=index_64,
                              BLOCK_C=128 if channels_last else 1, BLOCK_I=16 if channels_last else 2048)
                ints = dict(C=i32, INNER=i32, n_inner_blocks=i32, s_o=i64 if index_64 else i32,
                            s_i=i32, s_c=i32)
                for backward in (False, True):
                    sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", stats_ptr="*fp32", partial_ptr="*fp64",
                               **ints, n_tiles=i32, tiles_per_program=i32, BACKWARD="constexpr",
                               **{k: "constexpr" for k in layout})
                    variants.append((_channel_sums_kernel, sig, dict(BACKWARD=backward, **layout)))
                for has_dy in (False, True):
                    sig = dict(x_ptr=f"*{dtype}", dy_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                               pivot_ptr="*fp32", offset_ptr="*fp32", coef_x_ptr="*fp32",
                               coef_dy_ptr="*fp32", coef_0_ptr="*fp32", **ints, HAS_DY="constexpr",
                               **{k: "constexpr" for k in layout})
                    variants.append((_per_channel_affine_kernel, sig, dict(HAS_DY=has_dy, **layout)))
    finalize_consts = dict(BLOCK_C=FINALIZE_BLOCK_C, BLOCK_P=FINALIZE_BLOCK_P)
    for training in (False, True):
        for affine in (False, True):
            sig = dict(x_ptr="*fp32", partial_ptr="*fp64", weight_ptr="*fp32", bias_ptr="*fp32",
                       running_mean_ptr="*fp32", running_std_ptr="*fp32", num_batches_tracked_ptr="*i64",
                       stats_ptr="*fp32", P=i32, C=i32, s_c=i32, count=f32, eps=f32, momentum=f32,
                       **{k: f32 for k in ("r_slope", "r_start", "r_low", "r_high",
                                           "d_slope", "d_start", "d_low", "d_high")},
                       TRAINING="constexpr", HAS_WEIGHT="constexpr", HAS_BIAS="constexpr",
                       BLOCK_C="constexpr", BLOCK_P="constexpr")
            variants.append((_batch_renorm_forward_finalize_kernel, sig,
                             dict(TRAINING=training, HAS_WEIGHT=affine, HAS_BIAS=affine, **finalize_consts)))
            sig = dict(partial_ptr="*fp64", weight_ptr="*fp32", stats_ptr="*fp32", grads_ptr="*fp32",
                       P=i32, C=i32, count=f32, TRAINING="constexpr", HAS_WEIGHT="constexpr",
                       BLOCK_C="constexpr", BLOCK_P="constexpr")
            variants.append((_batch_renorm_backward_finalize_kernel, sig,
                             dict(TRAINING=training, HAS_WEIGHT=affine, **finalize_consts)))
    return variants
