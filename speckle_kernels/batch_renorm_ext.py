"""The C++ CPU / CUDA BatchRenorm ops (csrc/cpu/batch_renorm_cpu.cpp, csrc/cuda/batch_renorm.cu):
their autograd glue and fake kernels.

The ops: batch_renorm_forward(x, weight?, bias?, running_mean!, running_std!,
num_batches_tracked!, training, momentum, eps, r_max[4], d_max[4]) -> (y, stats (8, C) fp32)
updates the running buffers on the device; batch_renorm_backward(dy, x, weight?, stats,
training) -> (dx, dweight, dbias). The math and the stats rows are batch_renorm_contract.py's.
"""
from __future__ import annotations

import torch

from . import _ext
from .batch_renorm_contract import N_STATS, kernel_input
from .schedules import RenormSchedule


class BatchRenormExtFunction(torch.autograd.Function):
    """y = batch_renorm(x) through the extension's ops; saves x and the (8, C) fp32 stats."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked,
                training, momentum, eps, r_max, d_max):
        y, stats = torch.ops.speckle_kernels.batch_renorm_forward(
            x, weight, bias, running_mean, running_std, num_batches_tracked, training,
            momentum, eps, r_max.as_list(), d_max.as_list())
        ctx.save_for_backward(x, weight, stats)
        ctx.training = training
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stats = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.speckle_kernels.batch_renorm_backward(
            dy, x, weight, stats, ctx.training)
        param_dtype = weight.dtype if weight is not None else dbias.dtype
        dweight = dweight.to(param_dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = dbias.to(param_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def batch_renorm(x, weight, bias, running_mean, running_std, num_batches_tracked, *,
                 training: bool, momentum: float, eps: float,
                 r_max: RenormSchedule, d_max: RenormSchedule) -> torch.Tensor:
    """Batch renormalization through the C++/CUDA kernels; updates the running buffers in place
    when training."""
    return BatchRenormExtFunction.apply(x, weight, bias, running_mean, running_std,
                                        num_batches_tracked, bool(training), float(momentum),
                                        float(eps), r_max, d_max)


# Fake (meta) kernels: shapes, dtypes and layouts of the ops' outputs, so that torch.compile
# (fullgraph) traces through the C++/CUDA ops instead of breaking the graph on them.
def _register_fake_kernels():  # once the ops exist (_ext.on_cpu_load)
    @torch.library.register_fake("speckle_kernels::batch_renorm_forward")
    def _(x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum,
          eps, r_max, d_max):
        return torch.empty_like(kernel_input(x)), x.new_empty((N_STATS, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("speckle_kernels::batch_renorm_backward")
    def _(dy, x, weight, stats, training):
        c = x.shape[1]
        return (torch.empty_like(kernel_input(x)), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32))


_ext.on_cpu_load(_register_fake_kernels)
