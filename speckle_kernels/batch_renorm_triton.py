"""Fused batch renormalization in Triton, host side: the tile layout, the launchers, the
torch.library ops with their autograd (the kernels are batch_renorm_triton_kernels.py's, the
equations and stats rows batch_renorm_contract.py's).

Two ops, because an op that mutates its inputs cannot carry an autograd formula: the
statistics (mutates the running buffers, no gradient) and the normalization, whose backward
holds the whole gradient, including the part that flows through the batch mean and std.
Registered as torch ops so that torch.compile(fullgraph=True) traces through the layer (as
opaque calls); eager calls run the same functions through a plain autograd.Function, which
costs a quarter of the host time (_EagerNormalize). The norm block's Triton backend reuses the
statistics op, backward_finalize and normalize_grads.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import batch_renorm_triton_kernels as kernels
from . import triton_common as tc  # read as tc.NAME at call time: benchmarks/tools/tune_gpu.py sets them
from .batch_renorm_contract import (GRAD_A, GRAD_B, GRAD_BIAS, GRAD_MEAN_DY, GRAD_WEIGHT, N_GRADS,
                                    N_STATS, STAT_MEAN_OFFSET, STAT_PIVOT, STAT_SCALE, STAT_SHIFT,
                                    kernel_input)
from .schedules import RenormSchedule

class Layout:
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
            self.block_c = min(tc.next_power_of_2(c), 128)
            self.block_i = min(max(tc.TILE_ELEMENTS // self.block_c, 1), tc.next_power_of_2(self.inner))
        else:
            self.block_i = min(tc.next_power_of_2(self.inner), tc.TILE_ELEMENTS)
            self.block_c = min(max(tc.TILE_ELEMENTS // self.block_i, 1), tc.next_power_of_2(c))
        self.n_inner_blocks = tc.cdiv(self.inner, self.block_i)
        self.n_tiles = self.outer * self.n_inner_blocks
        self.c_blocks = tc.cdiv(c, self.block_c)
        s_o, s_i, s_c = self.strides
        self.index_64 = tc.needs_index_64((self.outer - 1, s_o), (self.n_inner_blocks * self.block_i - 1, s_i),
                                          (self.c_blocks * self.block_c - 1, s_c))

    def match(self, t: torch.Tensor) -> torch.Tensor:
        """t (same shape as x) with x's memory layout, copying only when it differs."""
        if t.stride() == self.tensor.stride():
            return t
        return torch.empty_like(self.tensor).copy_(t)

    def launch_args(self):
        return dict(CHANNELS_LAST=self.channels_last, INDEX_64=self.index_64,
                    BLOCK_C=self.block_c, BLOCK_I=self.block_i)


def channel_sums(layout: Layout, dy: torch.Tensor | None, stats: torch.Tensor | None) -> torch.Tensor:
    x = layout.tensor
    programs, tiles_per_program = tc.programs_for_reduction(layout.n_tiles, layout.c_blocks, x.device)
    partial = torch.empty((3, programs, layout.C), device=x.device, dtype=torch.float64)
    backward = dy is not None
    kernels.channel_sums_kernel[(programs, layout.c_blocks)](
        x, dy if backward else x, stats if backward else partial, partial,
        layout.C, layout.inner, layout.n_inner_blocks, layout.n_tiles, tiles_per_program,
        *layout.strides, BACKWARD=backward, num_warps=tc.SUMS_NUM_WARPS, **layout.launch_args())
    return partial


def per_channel_affine(layout: Layout, x, dy, stats, coef_x, coef_dy, coef_0) -> torch.Tensor:
    out = torch.empty_like(layout.tensor)
    kernels.per_channel_affine_kernel[(layout.n_tiles, layout.c_blocks)](
        x, dy if dy is not None else x, out, stats[STAT_PIVOT], stats[STAT_MEAN_OFFSET], coef_x, coef_dy if dy is not None else coef_x,
        coef_0, layout.C, layout.inner, layout.n_inner_blocks, *layout.strides,
        HAS_DY=dy is not None, num_warps=tc.AFFINE_NUM_WARPS, **layout.launch_args())
    return out


def batch_renorm_statistics(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                            training: bool, momentum: float, eps: float,
                            r_max: RenormSchedule, d_max: RenormSchedule) -> torch.Tensor:
    """The (8, C) fp32 rows STAT_*; updates the running buffers when training (on the device)."""
    layout = Layout(x)
    C = layout.C
    stats = torch.empty((N_STATS, C), device=x.device, dtype=torch.float32)
    # eval reads no partials; an empty fp64 buffer keeps the kernel's one signature
    partial = channel_sums(layout, None, None) if training else stats.new_empty((3, 0, C), dtype=torch.float64)
    kernels.forward_finalize_kernel[(tc.cdiv(C, tc.FINALIZE_BLOCK_C),)](
        layout.tensor, partial, weight if weight is not None else stats,
        bias if bias is not None else stats, running_mean, running_std, num_batches_tracked, stats,
        partial.shape[1], C, layout.strides[2], float(eps), float(momentum),
        r_max.slope, r_max.start, r_max.low, r_max.high, d_max.slope, d_max.start, d_max.low, d_max.high,
        TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=tc.FINALIZE_BLOCK_C, BLOCK_P=tc.FINALIZE_BLOCK_P)
    if training:  # after the finalize kernel has read t: its programs must all see the same t
        num_batches_tracked.add_(1)
    return stats


def batch_renorm_normalize(layout: Layout, stats: torch.Tensor) -> torch.Tensor:
    return per_channel_affine(layout, layout.tensor, None, stats, stats[STAT_SCALE], None, stats[STAT_SHIFT])


def backward_finalize(partial: torch.Tensor, weight, stats: torch.Tensor, count: int, *,
                      training: bool) -> torch.Tensor:
    """The (N_GRADS, C) fp32 rows GRAD_* from the (>= 2, P, C) fp64 partial sums S(g), S(g*u)
    (g: dy here; the norm block's g = dy through dropout and the activation)."""
    C = partial.shape[2]
    grads = torch.empty((N_GRADS, C), device=partial.device, dtype=torch.float32)
    kernels.backward_finalize_kernel[(tc.cdiv(C, tc.FINALIZE_BLOCK_C),)](
        partial, weight if weight is not None else stats, stats, grads, partial.shape[1], C, int(count),
        TRAINING=training, HAS_WEIGHT=weight is not None,
        BLOCK_C=tc.FINALIZE_BLOCK_C, BLOCK_P=tc.FINALIZE_BLOCK_P)
    return grads


def batch_renorm_backward(dy, layout: Layout, weight, stats, *, training: bool):
    """Triton backward. Returns (dx, grads), grads the (5, C) fp32 rows GRAD_*."""
    dy = layout.match(dy)
    partial = channel_sums(layout, dy, stats)
    grads = backward_finalize(partial, weight, stats, dy.numel() // layout.C, training=training)
    dx = per_channel_affine(layout, layout.tensor, dy, stats, grads[GRAD_B], grads[GRAD_A],
                            grads[GRAD_MEAN_DY])
    return dx, grads


# The two ops (the module header says why two): autograd, functionalization and CUDA graphs
# see normal ops.
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
    return batch_renorm_normalize(Layout(x), stats)


@batch_renorm_triton_normalize.register_fake
def _(x, weight, bias, stats, training):
    return torch.empty_like(kernel_input(x))


@torch.library.custom_op("speckle_kernels::batch_renorm_triton_backward", mutates_args=())
def batch_renorm_triton_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                                 stats: torch.Tensor, training: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, grads): grads is (5, C) fp32 with rows GRAD_* (dweight, dbias first)."""
    return batch_renorm_backward(dy, Layout(x), weight, stats, training=training)


@batch_renorm_triton_backward.register_fake
def _(dy, x, weight, stats, training):
    return torch.empty_like(kernel_input(x)), x.new_empty((N_GRADS, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stats, training = inputs
    ctx.save_for_backward(x, weight, stats)
    ctx.training = training
    ctx.has_bias = bias is not None


def normalize_grads(ctx, dy, backward, saved=None):
    """The normalize op's input gradients, with backward(dy, x, weight, stats, training) giving
    (dx, grads): the registered op under torch.compile, the plain function in eager mode.
    saved: ctx.saved_tensors when the caller has read them (the norm block saves more tensors
    after these three; a non-reentrant checkpoint lets each be unpacked once)."""
    x, weight, stats = (ctx.saved_tensors if saved is None else saved)[:3]
    dx, grads = backward(dy, x, weight, stats, ctx.training)
    param_dtype = weight.dtype if weight is not None else torch.float32
    dweight = grads[GRAD_WEIGHT].to(param_dtype) if weight is not None else None
    dbias = grads[GRAD_BIAS].to(param_dtype) if ctx.has_bias else None
    return dx, dweight, dbias, None, None


def _normalize_backward(ctx, dy):
    return normalize_grads(ctx, dy, batch_renorm_triton_backward)


batch_renorm_triton_normalize.register_autograd(_normalize_backward, setup_context=_setup_context)


class _EagerNormalize(torch.autograd.Function):
    """The normalize op's eager twin. torch.library's Python custom ops cost ~100 us of host time
    a call in eager mode (measured on an H100's host: 500 us a forward against 160 us of GPU
    work), so eager calls run the same functions through a plain autograd.Function and
    torch.compile traces the registered ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, stats, training):
        _setup_context(ctx, (x, weight, bias, stats, training), None)
        return batch_renorm_normalize(Layout(x), stats)

    @staticmethod
    def backward(ctx, dy):
        return normalize_grads(ctx, dy, lambda dy, x, weight, stats, training: batch_renorm_backward(
            dy, Layout(x), weight, stats, training=training))


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


