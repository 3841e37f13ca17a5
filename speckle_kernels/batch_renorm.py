"""Batch renormalization: the public function, its input checks and the dispatcher.

    batch_renorm(x, running_mean, running_std, num_batches_tracked, weight, bias, *, training,
                 momentum, eps, r_max, d_max, backend="auto")

One op, one file per backend: batch_renorm_triton.py (Triton kernels, their ops and autograd),
batch_renorm_ext.py (the C++ CPU and CUDA kernels of csrc/), reference.py (plain torch). The
equations are in batch_renorm_triton.py's header; the r_max/d_max schedules in schedules.py.
backend="auto" follows the rule of _backend.py: the CUDA extension, then Triton, on a GPU; the
C++ kernel on a CPU; else the reference. float64 input runs the reference under "auto".
"""
from __future__ import annotations

import torch

from . import _ext, batch_renorm_ext, batch_renorm_triton
from ._backend import resolve_backend
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule

__all__ = ["batch_renorm", "check_inputs", "choose_backend"]


def check_inputs(x, running_mean, running_std, num_batches_tracked, weight, bias, momentum, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {x.dim()}D input")
    if x.numel() == 0:
        raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_std", running_std),
                    ("weight", weight), ("bias", bias)):
        if t is None and name in ("weight", "bias"):
            continue
        if t.shape != (C,):
            raise ValueError(f"expected {name} of shape ({C},) for an input with {C} channels, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if num_batches_tracked.numel() != 1 or num_batches_tracked.dtype != torch.long:
        raise ValueError("num_batches_tracked must be a one-element int64 tensor, got "
                         f"{num_batches_tracked.dtype} of shape {tuple(num_batches_tracked.shape)}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def choose_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs x: _backend.resolve_backend's rule with the extensions built here;
    float64 runs the reference under "auto" and is refused by a fused backend asked for."""
    chosen = resolve_backend(backend, x.device, has_cpu_ext=_ext.HAS_CPU_EXT,
                             has_cuda_ext=_ext.HAS_CUDA_EXT)
    if chosen != "reference" and x.dtype == torch.float64:
        if backend != "auto":
            raise TypeError(f"backend={backend!r} supports float32, float16 and bfloat16, got {x.dtype}")
        chosen = "reference"
    return chosen


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
    chosen = choose_backend(backend, x)
    if chosen == "reference":
        from .reference import batch_renorm_reference
        return batch_renorm_reference(x, running_mean, running_std, num_batches_tracked, weight, bias,
                                      training=training, momentum=float(momentum), eps=float(eps),
                                      r_max=r_max, d_max=d_max)
    run = batch_renorm_triton.batch_renorm if chosen == "triton" else batch_renorm_ext.batch_renorm
    return run(x, weight, bias, running_mean, running_std, num_batches_tracked, training=training,
               momentum=float(momentum), eps=float(eps), r_max=r_max, d_max=d_max)
