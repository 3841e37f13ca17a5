"""The norm block: BatchRenorm -> activation -> dropout in one pass. Public function, checks,
dispatcher.

    batch_renorm_act(x, running_mean, running_std, num_batches_tracked, weight, bias, *,
                     training, momentum, eps, r_max, d_max, activation="leaky_relu",
                     negative_slope=0.1, dropout=0.0, rng=None, backend="auto")

The contract (activations, the dropout mask stream, the rng state) is
batch_renorm_act_contract.py's; the
BatchRenorm part is batch_renorm()'s, with the same backends: batch_renorm_act_triton.py,
batch_renorm_act_ext.py (the C++ CPU and CUDA kernels), reference.py. Each fused backend runs
the statistics pass, then one pass that writes y (forward); the backward regenerates the mask
and the pre-activation from x, so the block saves only x.
"""
from __future__ import annotations

import torch

from . import batch_renorm_act_ext, batch_renorm_act_triton
from ._backend import choose_backend
from .batch_renorm_act_contract import ACTIVATION_CODES, check_block_args, check_rng, mask_is_active
from .batch_renorm_contract import check_inputs
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule

__all__ = ["batch_renorm_act"]


_UNREAD_RNG: dict = {}


def _unread_rng(device: torch.device) -> torch.Tensor:
    """The kernels' rng argument where no mask is drawn (never read): one int64 (2,) tensor a
    device, made once, so that a call without dropout allocates nothing for it."""
    if torch.compiler.is_compiling():
        return torch.zeros(2, dtype=torch.int64, device=device)
    rng = _UNREAD_RNG.get(device)
    if rng is None:
        rng = torch.zeros(2, dtype=torch.int64, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _UNREAD_RNG[device] = rng  # not a tensor of a graph's private pool
    return rng


def batch_renorm_act(
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
    activation: str = "leaky_relu",
    negative_slope: float = 0.1,
    dropout: float = 0.0,
    rng: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """dropout(act(batch_renorm(x))) for x (N, C, *); updates the running buffers when training.

    rng: the (seed, offset) int64 tensor of shape (2,) on x's device that keys the dropout
    mask; needed when training with dropout > 0, read on the device, never modified (the
    modules pass a snapshot and advance their own). backend: as batch_renorm's.
    """
    check_inputs(x, running_mean, running_std, num_batches_tracked, weight, bias, momentum, eps)
    check_block_args(activation, negative_slope, dropout)
    if rng is not None:
        check_rng(rng, x.device)
    elif mask_is_active(training, dropout):
        raise ValueError(f"dropout={dropout} in training needs rng, the (seed, offset) int64 tensor")
    else:
        rng = _unread_rng(x.device)
    chosen = choose_backend(backend, x.device, x.dtype)
    common = dict(training=bool(training), momentum=float(momentum), eps=float(eps), r_max=r_max, d_max=d_max)
    if chosen == "reference":
        from .reference import batch_renorm_act_reference
        return batch_renorm_act_reference(
            x, running_mean, running_std, num_batches_tracked, weight, bias, **common,
            activation=activation, negative_slope=float(negative_slope), dropout=float(dropout),
            seed=rng[0], offset=rng[1])
    block = dict(activation=ACTIVATION_CODES[activation], negative_slope=float(negative_slope),
                 dropout=float(dropout), rng=rng)
    run = batch_renorm_act_triton.batch_renorm_act if chosen == "triton" else batch_renorm_act_ext.batch_renorm_act
    return run(x, weight, bias, running_mean, running_std, num_batches_tracked, **common, **block)
