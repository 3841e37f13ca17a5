"""FusedBatchRenorm1d/2d/3d: drop-in modules for the third-party BatchRenorm layers.

Same constructor, parameter and buffer names (weight, bias, running_mean, running_std,
num_batches_tracked) as github.com/ludvb/batchrenorm, so state_dicts move both ways. The
modules own parameters and buffers and call `batch_renorm`; the kernels live elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ._backend import check_backend_name
from .batch_renorm import batch_renorm
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
            x, self.running_mean, self.running_std, self.num_batches_tracked,
            self.weight, self.bias, training=self.training, momentum=self.momentum, eps=self.eps,
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
