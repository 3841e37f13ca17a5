"""The C++ CPU / CUDA norm-block ops (csrc/cpu/batch_renorm_act_cpu.cpp,
csrc/cuda/batch_renorm_act.cu): their autograd glue and fake kernels.

The ops (schemas in csrc/ops_schema.cpp): batch_renorm_act_forward(x, weight?, bias?,
running_mean!, running_std!, num_batches_tracked!, training, momentum, eps, r_max[4], d_max[4],
activation, negative_slope, dropout, rng) -> (y, stats); batch_renorm_act_backward(dy, x,
weight?, stats, training, activation, negative_slope, dropout, rng) -> (dx, dweight, dbias);
batch_renorm_stats(...) -> stats, the statistics pass alone. The saved tensors are x, weight,
the (8, C) stats and the 16-byte rng snapshot: no mask, no y.
"""
from __future__ import annotations

import torch

from . import _ext
from .batch_renorm_act_contract import dropout_keep_mask, keep_scale, negative_side_slope
from .batch_renorm_contract import N_STATS, STAT_MEAN_OFFSET, STAT_PIVOT, STAT_SCALE, STAT_SHIFT, kernel_input
from .schedules import RenormSchedule


class BatchRenormActExtFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked, training,
                momentum, eps, r_max, d_max, activation, negative_slope, dropout, rng):
        y, stats = torch.ops.speckle_kernels.batch_renorm_act_forward(
            x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
            r_max.as_list(), d_max.as_list(), activation, negative_slope, dropout, rng)
        BatchRenormActExtFunction.keep_for_backward(ctx, x, weight, bias, stats, rng,
                                                    (training, activation, negative_slope, dropout))
        return y

    @staticmethod
    def keep_for_backward(ctx, x, weight, bias, stats, rng, block) -> None:
        """x, weight, the stats and the rng snapshot: all the backward op reads."""
        ctx.save_for_backward(x, weight, stats, rng)
        ctx.block = block
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats, rng = ctx.saved_tensors
        training, activation, negative_slope, dropout = ctx.block
        dx, dweight, dbias = torch.ops.speckle_kernels.batch_renorm_act_backward(
            dy, x, weight, stats, training, activation, negative_slope, dropout, rng)
        param_dtype = weight.dtype if weight is not None else dbias.dtype
        dweight = dweight.to(param_dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbias.to(param_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (dx, dweight, dbias) + (None,) * 12


def apply_block_pointwise(x, stats, activation: int, negative_slope: float, dropout: float, rng):
    """The forward's element pass in plain torch ops (the kernels' arithmetic, fp32):
    what Inductor can fuse with its neighbours."""
    view = [1, x.shape[1]] + [1] * (x.dim() - 2)
    row = lambda k: stats[k].view(view)  # noqa: E731
    z = ((x.float() - row(STAT_PIVOT)) - row(STAT_MEAN_OFFSET)) * row(STAT_SCALE) + row(STAT_SHIFT)
    slope = negative_side_slope(activation, negative_slope)
    if slope != 1.0:
        z = torch.where(z > 0, z, z * slope)
    if dropout > 0.0:
        keep = dropout_keep_mask(tuple(x.shape), dropout, seed=rng[0], offset=rng[1], device=x.device)
        z = torch.where(keep, z * keep_scale(dropout), torch.zeros_like(z))
    return z.to(x.dtype)


class BatchRenormActDecomposedFunction(BatchRenormActExtFunction):
    """Design (b): the statistics op, then the element pass as torch ops; the same fused
    backward op."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked, training,
                momentum, eps, r_max, d_max, activation, negative_slope, dropout, rng):
        stats = torch.ops.speckle_kernels.batch_renorm_stats(
            x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
            r_max.as_list(), d_max.as_list())
        y = apply_block_pointwise(x, stats, activation, negative_slope, dropout if training else 0.0, rng)
        BatchRenormActExtFunction.keep_for_backward(ctx, x, weight, bias, stats, rng,
                                                    (training, activation, negative_slope, dropout))
        return y


def batch_renorm_act(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                     training: bool, momentum: float, eps: float, r_max: RenormSchedule,
                     d_max: RenormSchedule, activation: int, negative_slope: float, dropout: float,
                     rng: torch.Tensor, decomposed: bool = False) -> torch.Tensor:
    """The norm block through the C++/CUDA kernels; updates the running buffers when training.

    decomposed: design (b), the element pass as torch ops, instead of (a), the fused forward
    op. (a) is the default: in a compiled Br-U-Net training step (blocks without dropout) the two
    took the same time (b/a = 1.01 in the committed run, within the machine's noise), and
    with dropout (b)'s mask in torch integer ops made a compiled block 9x slower
    (benchmarks/results/cpu-2026-12-02/compile_designs.md)."""
    fn = BatchRenormActDecomposedFunction if decomposed else BatchRenormActExtFunction
    return fn.apply(x, weight, bias, running_mean, running_std, num_batches_tracked, training,
                    momentum, eps, r_max, d_max, activation, negative_slope, dropout, rng)


def _register_fake_kernels():  # once the ops exist (_ext.on_cpu_load)
    @torch.library.register_fake("speckle_kernels::batch_renorm_act_forward")
    def _(x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
          r_max, d_max, activation, negative_slope, dropout, rng):
        return torch.empty_like(kernel_input(x)), x.new_empty((N_STATS, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("speckle_kernels::batch_renorm_act_backward")
    def _(dy, x, weight, stats, training, activation, negative_slope, dropout, rng):
        c = x.shape[1]
        return (torch.empty_like(kernel_input(x)), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32))

    @torch.library.register_fake("speckle_kernels::batch_renorm_stats")
    def _(x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
          r_max, d_max):
        return x.new_empty((N_STATS, x.shape[1]), dtype=torch.float32)


_ext.on_cpu_load(_register_fake_kernels)
