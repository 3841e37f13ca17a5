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
from ._backend import kernel_input
from .batch_renorm_ext import N_STATS
from .schedules import RenormSchedule


class BatchRenormActExtFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked, training,
                momentum, eps, r_max, d_max, activation, negative_slope, dropout, rng):
        y, stats = torch.ops.speckle_kernels.batch_renorm_act_forward(
            x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum, eps,
            r_max.as_list(), d_max.as_list(), activation, negative_slope, dropout, rng)
        ctx.save_for_backward(x, weight, stats, rng)
        ctx.block = (training, activation, negative_slope, dropout)
        ctx.has_bias = bias is not None
        return y

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


def batch_renorm_act(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                     training: bool, momentum: float, eps: float, r_max: RenormSchedule,
                     d_max: RenormSchedule, activation: int, negative_slope: float, dropout: float,
                     rng: torch.Tensor) -> torch.Tensor:
    """The norm block through the C++/CUDA kernels; updates the running buffers when training."""
    return BatchRenormActExtFunction.apply(x, weight, bias, running_mean, running_std,
                                           num_batches_tracked, training, momentum, eps, r_max, d_max,
                                           activation, negative_slope, dropout, rng)


if _ext.HAS_CPU_EXT:
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
