"""What the Triton backends share: tile geometry, the launch constants, the stats rows as
kernel constants, and small @triton.jit helpers (a per-channel vector laid along a tile's
channel axis, a tile's per-channel sum, the Philox word -> uniform map).

Tiles. Every Triton kernel of the package views x as (outer, inner, C) (or the norm block's
(N, L, C)) with element strides and no copy, and takes tiles of BLOCK_C channels by BLOCK_I
positions with the contiguous dimension as the tile's last axis, so that loads coalesce:
(BLOCK_C, BLOCK_I) for contiguous NC* input, (BLOCK_I, BLOCK_C) for channels_last. A tile has
at most TILE_ELEMENTS values: 16 fp32 values a thread at 4 warps, enough bytes in flight.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON
from .batch_renorm_contract import (GRAD_A, GRAD_B, GRAD_BIAS, GRAD_MEAN_DY, GRAD_WEIGHT, STAT_D,
                                    STAT_INV_S, STAT_MEAN_OFFSET, STAT_PIVOT, STAT_R, STAT_SCALE,
                                    STAT_SHIFT, STAT_SIGMA)
from .philox import STREAM_DROPOUT, UNIFORM_SCALE

TILE_ELEMENTS = 2048
SUMS_NUM_WARPS = 4
AFFINE_NUM_WARPS = 4
REDUCTION_PROGRAMS_PER_SM = 8  # programs along a reduction: a few waves of the GPU
# Channels-last input has one channel block, so its reduction splits into ~8 partials a
# multiprocessor (P ~ 1000): the merge loop is latency-bound, so it walks 128 partials a step
# over 16 channels a program (at 64 x 32 it cost ~35 us an H100, a fifth of the forward).
FINALIZE_BLOCK_C = 16
FINALIZE_BLOCK_P = 128


def cdiv(a: int, b: int) -> int:
    # triton.cdiv and triton.next_power_of_2 go through Triton's constexpr wrappers: several
    # microseconds a call, on a path where the host's time per layer is the budget.
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def needs_index_64(*index_strides) -> bool:
    """True when some lane of a launch forms an element offset of 2**31 or more, so the kernel
    must widen its indices before they multiply a stride (INDEX_64): index_strides are the
    (largest index any lane takes on an axis, masked lanes included, stride) of each axis."""
    return sum(i * s for i, s in index_strides) >= 2 ** 31


def programs_for_reduction(n_tiles: int, c_blocks: int, device: torch.device) -> tuple[int, int]:
    """(programs along the reduction, tiles each): a few waves of the GPU in all."""
    if device.type == "cuda":
        target = REDUCTION_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after the other: fewer, longer ones
        target = 4
    per_channel_block = max(1, min(n_tiles, cdiv(target, c_blocks)))
    tiles_per_program = cdiv(n_tiles, per_channel_block)
    return cdiv(n_tiles, tiles_per_program), tiles_per_program


if HAS_TRITON:
    import triton
    import triton.language as tl

    # Kernels may only read globals that are tl.constexpr: the contract's rows as such.
    ROW_PIVOT = tl.constexpr(STAT_PIVOT)
    ROW_MEAN_OFFSET = tl.constexpr(STAT_MEAN_OFFSET)
    ROW_SIGMA = tl.constexpr(STAT_SIGMA)
    ROW_R = tl.constexpr(STAT_R)
    ROW_D = tl.constexpr(STAT_D)
    ROW_INV_S = tl.constexpr(STAT_INV_S)
    ROW_SCALE = tl.constexpr(STAT_SCALE)
    ROW_SHIFT = tl.constexpr(STAT_SHIFT)
    ROW_GRAD_WEIGHT = tl.constexpr(GRAD_WEIGHT)
    ROW_GRAD_BIAS = tl.constexpr(GRAD_BIAS)
    ROW_GRAD_A = tl.constexpr(GRAD_A)
    ROW_GRAD_B = tl.constexpr(GRAD_B)
    ROW_GRAD_MEAN_DY = tl.constexpr(GRAD_MEAN_DY)
    DROPOUT_STREAM = tl.constexpr(STREAM_DROPOUT)
    _UNIFORM_SCALE = tl.constexpr(UNIFORM_SCALE)

    @triton.jit
    def per_channel(v, CHANNELS_LAST: tl.constexpr):
        # a (BLOCK_C,) per-channel vector laid along the tile's channel axis
        if CHANNELS_LAST:
            out = v[None, :]
        else:
            out = v[:, None]
        return out

    @triton.jit
    def tile_sum(v, CHANNELS_LAST: tl.constexpr):
        # Per-channel sum of a tile's fp32 values: a tree on a GPU (Triton's reduction: each
        # thread's values, then warp shuffles), so its error grows as log2(BLOCK_I); the
        # callers add tiles in fp64, once a tile and channel. (Under the interpreter tl.sum is
        # numpy's: pairwise along the contiguous axis, a running sum along a channels_last
        # tile's BLOCK_I rows, at most 16 of them at C >= 128, 512 at C <= 4.)
        if CHANNELS_LAST:
            out = tl.sum(v, axis=0)
        else:
            out = tl.sum(v, axis=1)
        return out

    @triton.jit
    def uniform(r):
        # uint32 Philox words -> float32 in [0, 1), as Triton's uint_to_uniform_float (philox.py).
        v = r.to(tl.int32, bitcast=True)
        v = tl.where(v < 0, ~v, v)
        return v.to(tl.float32) * _UNIFORM_SCALE
