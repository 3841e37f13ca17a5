"""Batch renormalization: the public function, its input checks and the dispatcher.

    batch_renorm(x, running_mean, running_std, num_batches_tracked, weight, bias, *, training,
                 momentum, eps, r_max, d_max, backend="auto")

One op, one file per backend: batch_renorm_triton.py (Triton kernels, their ops and autograd),
batch_renorm_ext.py (the C++ CPU and CUDA kernels of csrc/), reference.py (plain torch). What
every backend shares (the equations, the argument checks, the stats rows) is
batch_renorm_contract.py; the r_max/d_max schedules are schedules.py's. backend="auto" follows
the rule of _backend.py: the CUDA extension, then Triton, on a GPU; the C++ kernel on a CPU;
else the reference. float64 input runs the reference under "auto".
"""
from __future__ import annotations

import torch

from . import batch_renorm_ext, batch_renorm_triton
from ._backend import choose_backend
from .batch_renorm_contract import check_inputs
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule

__all__ = ["batch_renorm"]


def batch_renorm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_std: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.01,
    eps: float = 1e-3,
    r_max: RenormSchedule = RMAX_SCHEDULE,
    d_max: RenormSchedule = DMAX_SCHEDULE,
    backend: str = "auto",
) -> torch.Tensor:
    """Batch renormalization of x (N, C, *). Updates the running buffers in place when training.

    backend: "auto" (on CUDA the CUDA extension, else Triton; on CPU the C++ kernel; else the reference),
    "triton", "cuda", "cpu" or "reference".
    """
    check_inputs(x, running_mean, running_std, num_batches_tracked, weight, bias, momentum, eps)
    chosen = choose_backend(backend, x.device, x.dtype)
    if chosen == "reference":
        from .reference import batch_renorm_reference
        return batch_renorm_reference(x, running_mean, running_std, num_batches_tracked, weight, bias,
                                      training=training, momentum=float(momentum), eps=float(eps),
                                      r_max=r_max, d_max=d_max)
    run = batch_renorm_triton.batch_renorm if chosen == "triton" else batch_renorm_ext.batch_renorm
    return run(x, weight, bias, running_mean, running_std, num_batches_tracked, training=training,
               momentum=float(momentum), eps=float(eps), r_max=r_max, d_max=d_max)
