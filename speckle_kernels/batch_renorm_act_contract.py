"""The norm block's contract: BatchRenorm -> activation -> dropout, shared by every backend.

    y = dropout(act(batch_renorm(x)))
    act: "identity" | "relu" | "leaky_relu" (negative_slope), passed to the kernels as the
         codes ACTIVATION_CODES (csrc/include/norm_block_math.h's enum Activation); each is
         act(z) = z > 0 ? z : z * slope with slope negative_side_slope(): 1, 0, negative_slope
    dropout p in [0, 1), training only; kept values scaled by keep_scale(p) = float32(1/(1-p)),
         as nn.Dropout does.

The dropout mask is not stored: it is a function of (seed, offset, element index), the stream
below, which the backward regenerates. Element j of a call (row-major index of the logical
shape, whatever the memory layout) has e = offset + j; Philox4x32-10 (philox.py) of counter
(q lo, q hi, 0, STREAM_DROPOUT) with q = e >> 2, key seed, gives four words; e takes word
e & 3 and is kept iff uniform(word) >= float32(p). Four elements share one Philox call.

(seed, offset) travel as an int64 tensor `rng` of shape (2,) on the input's device, read there
(no host sync, CUDA-graph capturable). The modules draw it for each training call from torch's
generator of the input's device (draw_rng): torch.manual_seed makes the masks reproducible, a
CUDA graph replays fresh draws, and activation checkpointing, which saves and restores that
generator, recomputes the same mask (layers.py).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .noise_stream import check_counter
from .philox import STREAM_DROPOUT, U32, philox4x32_10, uniform_torch

ACTIVATIONS = ("identity", "relu", "leaky_relu")
ACTIVATION_IDENTITY, ACTIVATION_RELU, ACTIVATION_LEAKY_RELU = range(3)
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # the kernels' int
RNG_HIGH = 2 ** 62  # drawn seeds and offsets lie below: offset + element index stays < 2**63


def check_block_args(activation, negative_slope, dropout) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real) \
            or not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")


def check_rng(rng, device: torch.device) -> None:
    """rng: the (seed, offset) int64 tensor of shape (2,) on the input's device."""
    if not isinstance(rng, torch.Tensor):
        raise TypeError(f"rng must be an int64 tensor (seed, offset) of shape (2,), got {type(rng).__name__}")
    if rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        raise ValueError(f"rng must be an int64 tensor (seed, offset) of shape (2,), got {rng.dtype} "
                         f"of shape {tuple(rng.shape)}")
    if rng.device != device:
        raise ValueError(f"rng is on {rng.device} but the input is on {device}")


def draw_rng(device) -> torch.Tensor:
    """A fresh (seed, offset) from torch's generator of `device`, on the device (one small
    kernel on a GPU, no host sync; graph-safe under CUDA-graph capture, as torch's own dropout)."""
    return torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64, device=device)


def mask_is_active(training: bool, dropout: float) -> bool:
    return bool(training) and dropout > 0.0


def negative_side_slope(activation: int, negative_slope: float) -> float:
    """act'(z) where z <= 0 for an activation code: relu is leaky_relu with slope 0, identity
    has slope 1."""
    return {ACTIVATION_IDENTITY: 1.0, ACTIVATION_RELU: 0.0}.get(activation, float(negative_slope))


def keep_scale(p: float) -> float:
    """float32(1 / (1 - p)), the factor of kept values (nn.Dropout's), as every backend applies
    it; computed without creating a tensor (layers call this once a call)."""
    return float(np.float32(1.0 / (1.0 - p)))


def _counter_value(name: str, value):
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise TypeError(f"{name} must be an int or a one-element int64 tensor, got {value.dtype} "
                            f"of shape {tuple(value.shape)}")
        return value.reshape(())
    return check_counter(name, value)


def dropout_keep_mask(shape, p: float, *, seed=0, offset=0, device="cpu") -> torch.Tensor:
    """Boolean keep mask of `shape` for dropout probability p: the stream above in torch ops."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p!r}")
    seed, offset = _counter_value("seed", seed), _counter_value("offset", offset)
    numel = math.prod(shape)
    e = offset + torch.arange(numel, dtype=torch.int64, device=device)
    q = e >> 2
    zero = torch.zeros_like(e)
    words = torch.stack(philox4x32_10(seed, q & U32, q >> 32, zero, zero + STREAM_DROPOUT))
    r = words.gather(0, (e & 3).unsqueeze(0)).squeeze(0)
    return (uniform_torch(r) >= p).view(shape)
