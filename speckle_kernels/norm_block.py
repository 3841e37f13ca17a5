"""The norm block's contract: BatchRenorm -> activation -> dropout, shared by every backend.

    y = dropout(act(batch_renorm(x)))
    act: "identity" | "relu" | "leaky_relu" (negative_slope); dropout p in [0, 1), training only,
    kept values scaled by 1 / (1 - p) as nn.Dropout does.

The dropout mask is not stored: it is a function of (seed, offset, element index), the stream
documented in reference.py and csrc/include/norm_block_math.h, which the backward regenerates.
A module keeps (seed, offset) as an int64 device tensor and advances the offset by the
element count after each training call, on the device (no host sync, CUDA-graph capturable).
"""
from __future__ import annotations

import math
import numbers

import torch

from .noise_stream import U32, check_counter, philox4x32_10, uniform_torch

ACTIVATIONS = ("identity", "relu", "leaky_relu")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # the kernels' int


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


def new_rng(seed: int | None = None, device=None) -> torch.Tensor:
    """A (seed, offset = 0) state; without a seed, one drawn from torch's default generator
    (so torch.manual_seed makes a network's masks reproducible)."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.tensor([int(seed), 0], dtype=torch.int64, device=device)


def mask_is_active(training: bool, dropout: float) -> bool:
    return bool(training) and dropout > 0.0


# The mask stream (documented in reference.py's norm-block section), in torch integer ops.
_MASK_STREAM = 2


def _counter_value(name: str, value):
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.numel() != 1:
            raise TypeError(f"{name} must be an int or a one-element int64 tensor, got {value.dtype} "
                            f"of shape {tuple(value.shape)}")
        return value.reshape(())
    return check_counter(name, value)


def dropout_keep_mask(shape, p: float, *, seed=0, offset=0, device="cpu") -> torch.Tensor:
    """Boolean keep mask of `shape` for dropout probability p, from the counter-based stream."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p!r}")
    seed, offset = _counter_value("seed", seed), _counter_value("offset", offset)
    numel = math.prod(shape)
    e = offset + torch.arange(numel, dtype=torch.int64, device=device)
    q = e >> 2
    zero = torch.zeros_like(e)
    words = torch.stack(philox4x32_10(seed, q & U32, q >> 32, zero, zero + _MASK_STREAM))
    r = words.gather(0, (e & 3).unsqueeze(0)).squeeze(0)
    return (uniform_torch(r) >= p).view(shape)


def dropout_scale(p: float) -> float:
    """The factor of kept values, 1 / (1 - p): applied in float32 by every backend."""
    return 1.0 / (1.0 - p)
