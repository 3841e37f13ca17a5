"""The Triton kernels of batch renormalization (the equations are batch_renorm_contract.py's;
the launchers, ops and autograd are batch_renorm_triton.py's).

Memory traffic is the whole cost, so the work is three passes in forward (read x for the
statistics, read x + write y) and three in backward (read x, dy for the sums, read both again
+ write dx), plus tiny per-channel kernels. The per-channel reduction is split over many
programs (partials in a (3, P, C) fp64 buffer, merged by a second kernel): one program per
channel starves the GPU at U-Net's high-resolution layers (C=64, 524288 values per channel).
Statistics: u = x - pivot (the channel's first element), so that x - pivot is exact for data
like 1e4 + 1e-2*randn. Each tile's mean and M2 of u are two-pass in registers as fp32 trees
(its mean, then the squared deviations about it), its count is read off its indices, and tiles
and programs merge by Chan's formula in fp64: fp64 work once a tile and channel, never an
element. Sums of squares about a far-off pivot would lose a factor 1 + (mean - pivot)^2/var of
precision; this keeps two-pass accuracy with one read of x. The backward's sums are fp32 trees
a tile, added in fp64. The finalize kernels work in fp64 where they merge and divide by counts,
and round their fp32 divisions to nearest (tl.div_rn; a plain "/" is div.full.f32, 2 ulp).
Errors are judged against the same function in float64 (speckle_kernels/testing/batch_renorm.py):
at most 2x the fp32 reference's + 1 ulp.

Layouts: x is viewed as (outer, inner, C) with strides (s_o, s_i, s_c) and no copy:
contiguous NC* is (N, L, C) with s_i = 1; channels_last is (1, N*L, C) with s_c = 1 (tiles as
triton_common.py says). Offsets are int32 unless some lane's offset reaches 2**31
(triton_common.needs_index_64, on the host): then INDEX_64 widens every index before it meets
a stride (tests/test_triton_indexing.py, and the TTIR check of tests/test_aot_compile.py).
Nothing here synchronizes with the host: r, d, r_max, d_max and the running statistics live on
the device, so the layer can be captured in a CUDA graph.
"""
from __future__ import annotations

from ._backend import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import (ROW_D, ROW_GRAD_A, ROW_GRAD_B, ROW_GRAD_BIAS, ROW_GRAD_MEAN_DY,
                                ROW_GRAD_WEIGHT, ROW_INV_S, ROW_MEAN_OFFSET, ROW_PIVOT, ROW_R,
                                ROW_SCALE, ROW_SHIFT, ROW_SIGMA, per_channel, tile_sum)

    @triton.jit
    def tile_offsets(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c,
                     CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_I: tl.constexpr):
        # Offsets, mask and count of valid positions of tile t (outer index o, inner block) for
        # channels c1. The contiguous dimension is the tile's last axis: (BLOCK_I, BLOCK_C)
        # channels_last, else (BLOCK_C, BLOCK_I). With INDEX_64 every index is widened before it
        # multiplies a stride (channels_last: idx * C passes 2**31 with the tensor, and the
        # block start i0 itself where N*L does).
        o = t // n_inner_blocks
        i0 = t - o * n_inner_blocks
        ch = per_channel(c1, CHANNELS_LAST)
        if INDEX_64:
            o = o.to(tl.int64)
            i0 = i0.to(tl.int64)
            ch = ch.to(tl.int64)
        i0 = i0 * BLOCK_I
        ii = i0 + tl.arange(0, BLOCK_I)
        if CHANNELS_LAST:
            idx = ii[:, None]
        else:
            idx = ii[None, :]
        return o * s_o + idx * s_i + ch * s_c, (ch < C) & (idx < INNER), tl.minimum(INNER - i0, BLOCK_I)

    @triton.jit
    def first_offsets(c1, s_c, INDEX_64: tl.constexpr):
        # offset of each channel's first element (the pivot), widened as tile_offsets widens
        if INDEX_64:
            out = c1.to(tl.int64) * s_c
        else:
            out = c1 * s_c
        return out

    # do_not_specialize: integers that set loop bounds and tile counts only (no load's alignment
    # depends on them): specializing on "== 1" and "% 16" would compile a variant per value class
    @triton.jit(do_not_specialize=["n_inner_blocks", "n_tiles", "tiles_per_program"])
    def channel_sums_kernel(
        x_ptr, dy_ptr, stats_ptr, partial_ptr,  # x, dy: (outer, inner, C) strided; partial: (3, P, C) fp64
        C, INNER, n_inner_blocks, n_tiles, tiles_per_program,
        s_o, s_i, s_c,
        BACKWARD: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # Forward: per channel (count, mean, M2) of u = x - pivot. Each tile's are two-pass, in
        # registers and fp32 trees (its mean, then the squares about it; its count from its
        # indices), and tiles merge by Chan's formula in fp64, once a tile and channel: one read
        # of x, two-pass accuracy wherever the pivot sits in the data.
        # Backward: per channel sums of dy and dy*u, u = (x - pivot) - offset (the finalize divides
        # by sigma once, in fp64: a rounded 1/sigma in every term would bias them all alike), each
        # tile's (a tree in fp32) added in fp64.  One partial per program; merged by a finalize.
        p = tl.program_id(0)
        c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        if BACKWARD:
            shift = tl.load(stats_ptr + ROW_PIVOT * C + c1, mask=cmask, other=0.0)
            offset = tl.load(stats_ptr + ROW_MEAN_OFFSET * C + c1, mask=cmask, other=0.0)
        else:
            shift = tl.load(x_ptr + first_offsets(c1, s_c, INDEX_64), mask=cmask, other=0.0).to(tl.float32)
            offset = tl.zeros([BLOCK_C], tl.float32)
        shift2 = per_channel(shift, CHANNELS_LAST)
        offset2 = per_channel(offset, CHANNELS_LAST)
        acc_n = tl.zeros([BLOCK_C], tl.float64)   # forward: count; backward: sum of dy
        acc_a = tl.zeros([BLOCK_C], tl.float64)   # forward: mean;  backward: sum of dy*z
        acc_b = tl.zeros([BLOCK_C], tl.float64)   # forward: M2
        t_start = p * tiles_per_program
        t_end = tl.minimum(t_start + tiles_per_program, n_tiles)
        for t in range(t_start, t_end):
            offs, m, n_valid = tile_offsets(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c,
                                            CHANNELS_LAST, INDEX_64, BLOCK_I)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            u = tl.where(m, (x - shift2) - offset2, 0.0)
            if BACKWARD:
                dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
                acc_n += tile_sum(dy, CHANNELS_LAST).to(tl.float64)
                acc_a += tile_sum(dy * u, CHANNELS_LAST).to(tl.float64)
            else:
                # n_valid >= 1: a program's tiles all lie inside the tensor
                tile_mean = tl.div_rn(tile_sum(u, CHANNELS_LAST), n_valid.to(tl.float32))
                dev = tl.where(m, u - per_channel(tile_mean, CHANNELS_LAST), 0.0)
                tile_m2 = tile_sum(dev * dev, CHANNELS_LAST).to(tl.float64)
                n_b = n_valid.to(tl.float64)
                n_ab = acc_n + n_b
                w_b = n_b / n_ab
                delta = tile_mean.to(tl.float64) - acc_a
                acc_a += delta * w_b
                acc_b += tile_m2 + delta * delta * acc_n * w_b
                acc_n = n_ab
        n_programs = tl.num_programs(0)
        tl.store(partial_ptr + p * C + c1, acc_n, mask=cmask)
        tl.store(partial_ptr + (n_programs + p) * C + c1, acc_a, mask=cmask)
        if not BACKWARD:
            tl.store(partial_ptr + (2 * n_programs + p) * C + c1, acc_b, mask=cmask)

    @triton.jit(do_not_specialize=["n_inner_blocks"])
    def per_channel_affine_kernel(
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
        offs, m, _ = tile_offsets(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c, CHANNELS_LAST, INDEX_64,
                                  BLOCK_I)
        pivot2 = per_channel(pivot, CHANNELS_LAST)
        offset2 = per_channel(offset, CHANNELS_LAST)
        cx2 = per_channel(cx, CHANNELS_LAST)
        c02 = per_channel(c0, CHANNELS_LAST)
        cdy2 = per_channel(cdy, CHANNELS_LAST)
        out = ((tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - pivot2) - offset2) * cx2
        if HAS_DY:
            out += (tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32) - c02) * cdy2
        else:
            out += c02
        tl.store(out_ptr + offs, out, mask=m)

    @triton.jit
    def merge_sums(partial_ptr, row, P, C, c1, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # Deterministic fp64 sum of partial row `row` ((rows, P, C) layout) for channels c1.
        total = tl.zeros([BLOCK_C], tl.float64)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)[:, None]
            m = (pp < P) & cmask[None, :]
            total += tl.sum(tl.load(partial_ptr + (row * P + pp) * C + c1[None, :], mask=m, other=0.0), axis=0)
        return total

    @triton.jit
    def merge_moments(partial_ptr, P, C, c1, cmask, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
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

    @triton.jit(do_not_specialize=["P", "C", "s_c"])
    def forward_finalize_kernel(
        x_ptr, partial_ptr, weight_ptr, bias_ptr,
        running_mean_ptr, running_std_ptr, num_batches_tracked_ptr,  # (C,), (C,), () int64
        stats_ptr,  # out: (8, C) fp32, rows STAT_*
        P, C, s_c, eps, momentum,
        r_slope, r_start, r_low, r_high, d_slope, d_start, d_low, d_high,
        TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        rm = tl.load(running_mean_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        rs = tl.load(running_std_ptr + c1, mask=cmask, other=1.0).to(tl.float32)
        if TRAINING:
            n, mean_u64, m2 = merge_moments(partial_ptr, P, C, c1, cmask, BLOCK_C, BLOCK_P)
            pivot = tl.load(x_ptr + c1.to(tl.int64) * s_c, mask=cmask, other=0.0).to(tl.float32)
            mean_u = mean_u64.to(tl.float32)
            mean = pivot + mean_u
            std_biased = tl.sqrt(m2 / tl.maximum(n, 1.0)).to(tl.float32)
            sigma = std_biased + eps
            t = tl.load(num_batches_tracked_ptr).to(tl.float32)
            r_max = tl.minimum(tl.maximum(r_slope * t + r_start, r_low), r_high)
            d_max = tl.minimum(tl.maximum(d_slope * t + d_start, d_low), d_high)
            # IEEE-rounded fp32 divisions here and below (a plain "/" compiles to div.full.f32,
            # 2 ulp; the interpreter divides exactly, so its tests would not see the difference)
            r = tl.minimum(tl.maximum(tl.div_rn(sigma, rs), tl.div_rn(1.0, r_max)), r_max)
            d = tl.minimum(tl.maximum(tl.div_rn(mean - rm, rs), -d_max), d_max)
            inv_s = tl.where(std_biased > 0.0, tl.div_rn(1.0, tl.where(std_biased > 0.0, std_biased, 1.0)), 0.0)
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
        a = tl.div_rn(r, sigma)
        shift = d
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + c1, mask=cmask, other=1.0).to(tl.float32)
            a = a * w
            shift = shift * w
        if HAS_BIAS:
            shift += tl.load(bias_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        tl.store(stats_ptr + ROW_PIVOT * C + c1, pivot, mask=cmask)
        tl.store(stats_ptr + ROW_MEAN_OFFSET * C + c1, offset, mask=cmask)
        tl.store(stats_ptr + ROW_SIGMA * C + c1, sigma, mask=cmask)
        tl.store(stats_ptr + ROW_R * C + c1, r, mask=cmask)
        tl.store(stats_ptr + ROW_D * C + c1, d, mask=cmask)
        tl.store(stats_ptr + ROW_INV_S * C + c1, inv_s, mask=cmask)
        tl.store(stats_ptr + ROW_SCALE * C + c1, a, mask=cmask)
        tl.store(stats_ptr + ROW_SHIFT * C + c1, shift, mask=cmask)

    @triton.jit(do_not_specialize=["P", "C", "count"])
    def backward_finalize_kernel(
        partial_ptr, weight_ptr, stats_ptr,  # partial: (3, P, C) fp64, rows sum dy, sum dy*z; stats: (8, C)
        grads_ptr,  # out: (5, C) fp32, rows GRAD_*
        P, C, count,  # count: elements a channel, an int (exact past 2**24, unlike an fp32 argument)
        TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c1 < C
        sum_dy = merge_sums(partial_ptr, 0, P, C, c1, cmask, BLOCK_C, BLOCK_P)
        sum_dyz = merge_sums(partial_ptr, 1, P, C, c1, cmask, BLOCK_C, BLOCK_P)  # S(dy*u) for now
        sigma = tl.load(stats_ptr + ROW_SIGMA * C + c1, mask=cmask, other=1.0)
        r = tl.load(stats_ptr + ROW_R * C + c1, mask=cmask, other=0.0)
        d = tl.load(stats_ptr + ROW_D * C + c1, mask=cmask, other=0.0)
        inv_s = tl.load(stats_ptr + ROW_INV_S * C + c1, mask=cmask, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + c1, mask=cmask, other=0.0).to(tl.float32)
        else:
            w = tl.full([BLOCK_C], 1.0, tl.float32)
        coef_a = tl.div_rn(w * r, sigma)
        sum_dyz = sum_dyz / sigma.to(tl.float64)  # S(dy*u) -> S(dy*z)
        n = count.to(tl.float64)
        if TRAINING:
            coef_b = (-coef_a.to(tl.float64) * sum_dyz * inv_s.to(tl.float64) / n).to(tl.float32)
            mean_dy = (sum_dy / n).to(tl.float32)
        else:
            coef_b = tl.zeros([BLOCK_C], tl.float32)
            mean_dy = tl.zeros([BLOCK_C], tl.float32)
        dweight = r.to(tl.float64) * sum_dyz + d.to(tl.float64) * sum_dy
        tl.store(grads_ptr + ROW_GRAD_WEIGHT * C + c1, dweight.to(tl.float32), mask=cmask)
        tl.store(grads_ptr + ROW_GRAD_BIAS * C + c1, sum_dy.to(tl.float32), mask=cmask)
        tl.store(grads_ptr + ROW_GRAD_A * C + c1, coef_a, mask=cmask)
        tl.store(grads_ptr + ROW_GRAD_B * C + c1, coef_b, mask=cmask)
        tl.store(grads_ptr + ROW_GRAD_MEAN_DY * C + c1, mean_dy, mask=cmask)

