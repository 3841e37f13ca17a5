"""FusedBatchRenorm1d/2d/3d: drop-in modules for the third-party BatchRenorm layers, and
FusedBatchRenormAct1d/2d/3d: the same layer followed by an activation and dropout, in one pass.

Same constructor, parameter and buffer names (weight, bias, running_mean, running_std,
num_batches_tracked) as github.com/ludvb/batchrenorm, so state_dicts move both ways (and a
FusedBatchRenorm2d state_dict loads into a FusedBatchRenormAct2d). The modules own parameters
and buffers and call `batch_renorm` / `batch_renorm_act`; the kernels live elsewhere.

Under activation checkpointing (torch.utils.checkpoint, either mode) a recompute sees its
forward's buffers and mask and updates nothing (checkpoint_replay.py): checkpointed and plain
training give the same outputs, gradients and buffers. The dropout mask of each training call
is keyed by a (seed, offset) drawn from torch's generator of the input's device.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ._backend import check_backend_name
from .batch_renorm import batch_renorm
from .batch_renorm_act import batch_renorm_act
from .batch_renorm_act_contract import check_block_args, draw_rng
from .checkpoint_replay import RecomputeReplay
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule


def _as_schedule(value, default: RenormSchedule, name: str) -> RenormSchedule:
    if value is None:
        return default
    if isinstance(value, RenormSchedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return RenormSchedule.constant(float(value))
    raise TypeError(f"{name} must be None, a number or a RenormSchedule, got {value!r}")


class _FusedBatchRenorm(nn.Module):
    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 affine: bool = True, *, r_max=None, d_max=None, backend: str = "auto"):
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = affine
        self.r_max = _as_schedule(r_max, RMAX_SCHEDULE, "r_max")
        self.d_max = _as_schedule(d_max, DMAX_SCHEDULE, "d_max")
        self.backend = check_backend_name(backend)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._replay = RecomputeReplay()

    def running_buffers(self):
        """(running_mean, running_std, num_batches_tracked) as this call reads and updates them:
        the module's own, or in a checkpoint's recompute scratch copies of its forward's
        (checkpoint_replay.py)."""
        own = (self.running_mean, self.running_std, self.num_batches_tracked)
        return self._replay.buffers(*own) if self.training else own

    def _apply(self, fn, *args, **kwargs):
        self._replay.clear()  # snapshots on the old device or dtype would be replayed wrongly
        return super()._apply(fn, *args, **kwargs)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {wanted} input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in dim 1 of the input, "
                             f"got {x.shape[1]} (input shape {tuple(x.shape)})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return batch_renorm(
            x, *self.running_buffers(), self.weight, self.bias, training=self.training, momentum=self.momentum, eps=self.eps,
            r_max=self.r_max, d_max=self.d_max, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The third-party layer keeps weight and bias even with affine=False (unused there):
        # accept such a state_dict and drop the two tensors.
        if not self.affine:
            for key in ("weight", "bias"):
                state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, backend={self.backend!r}")


class FusedBatchRenorm1d(_FusedBatchRenorm):
    """Batch renormalization over (N, C) or (N, C, L) input."""
    _expected_dims = (2, 3)


class FusedBatchRenorm2d(_FusedBatchRenorm):
    """Batch renormalization over (N, C, H, W) input (contiguous or channels_last)."""
    _expected_dims = (4,)


class FusedBatchRenorm3d(_FusedBatchRenorm):
    """Batch renormalization over (N, C, D, H, W) input (contiguous or channels_last_3d)."""
    _expected_dims = (5,)


class _FusedBatchRenormAct(_FusedBatchRenorm):
    """BatchRenorm -> activation -> dropout. With dropout > 0 each training call draws its
    mask's (seed, offset) from torch's generator of the input's device, as nn.Dropout draws its
    mask: torch.manual_seed reproduces it, and a checkpoint's recompute redraws the same one."""

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01,
                 affine: bool = True, *, activation: str = "leaky_relu", negative_slope: float = 0.1,
                 dropout: float = 0.0, seed: int | None = None, r_max=None, d_max=None,
                 backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, r_max=r_max, d_max=d_max, backend=backend)
        check_block_args(activation, negative_slope, dropout)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.dropout = float(dropout)
        if seed is not None:
            warnings.warn("FusedBatchRenormAct*d(seed=...) is ignored: each training call draws its "
                          "dropout mask from torch's generator (seed it with torch.manual_seed)",
                          FutureWarning, stacklevel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # drawn before the buffers are chosen, in the forward and in a recompute alike
        rng = draw_rng(x.device) if self.training and self.dropout > 0.0 else None
        return batch_renorm_act(
            x, *self.running_buffers(), self.weight, self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps, r_max=self.r_max,
            d_max=self.d_max, activation=self.activation, negative_slope=self.negative_slope,
            dropout=self.dropout, rng=rng, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Until 2026-12 a module with dropout kept its mask stream in a `dropout_rng` buffer:
        # such a state_dict still loads (strictly), the retired buffer ignored.
        state_dict.pop(prefix + "dropout_rng", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        act = self.activation + (f"({self.negative_slope:g})" if self.activation == "leaky_relu" else "")
        return f"{super().extra_repr()}, activation={act}, dropout={self.dropout:g}"


class FusedBatchRenormAct1d(_FusedBatchRenormAct):
    """BatchRenorm -> activation -> dropout over (N, C) or (N, C, L) input."""
    _expected_dims = (2, 3)


class FusedBatchRenormAct2d(_FusedBatchRenormAct):
    """BatchRenorm -> activation -> dropout over (N, C, H, W) input (contiguous or channels_last)."""
    _expected_dims = (4,)


class FusedBatchRenormAct3d(_FusedBatchRenormAct):
    """BatchRenorm -> activation -> dropout over (N, C, D, H, W) input."""
    _expected_dims = (5,)
