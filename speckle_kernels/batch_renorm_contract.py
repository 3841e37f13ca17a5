"""The BatchRenorm contract every backend shares: the argument checks, the memory layouts the
fused kernels read, and the per-channel rows they pass between passes.

The function (reference.py holds the plain-torch oracle; schedules.py the r_max/d_max rules),
per channel c over every other dim:

    forward   mu, sigma = mean(x), sqrt(var_biased(x)) + eps
              r = clamp(sigma/rs, 1/r_max, r_max),  d = clamp((mu-rm)/rs, -d_max, d_max)
              y = (x-mu)*scale + shift,  scale = w*r/sigma,  shift = b + w*d
              rm += m*(mu-rm), rs += m*(sigma-rs), t += 1           (all on the device)
    eval      y = (x-rm)*w/rs + b
    backward  with z = (x-mu)/sigma, s = sigma-eps, n = elements per channel:
              dx = A*(dy - mean(dy)) + B*(x-mu),  A = w*r/sigma,  B = -w*r*sum(dy*z)/(n*s*sigma),
              dweight = r*sum(dy*z) + d*sum(dy),  dbias = sum(dy)

The stats rows: the forward's statistics pass leaves an (N_STATS, C) float32 tensor that the
element passes and the backward read, with the rows below in the same order in every fused
backend (csrc/include/batch_renorm_math.h's enum StatRow, the Triton kernels). The batch mean is
kept as pivot + offset (pivot: the channel's first element; offset: the mean of x - pivot), so
x - pivot is exact for data whose mean dwarfs its spread. The backward's per-channel results
are the (N_GRADS, C) rows GRAD_* (enum GradRow).
"""
from __future__ import annotations

import torch

# (N_STATS, C) float32: the forward's per-channel values (eval: pivot = rm, offset = 0,
# sigma = rs, r = 1, d = 0, inv_s = 0)
STAT_PIVOT, STAT_MEAN_OFFSET, STAT_SIGMA, STAT_R, STAT_D, STAT_INV_S, STAT_SCALE, STAT_SHIFT = range(8)
N_STATS = 8
# (N_GRADS, C) float32: dweight, dbias, and dx's coefficients A, B and mean(dy)
GRAD_WEIGHT, GRAD_BIAS, GRAD_A, GRAD_B, GRAD_MEAN_DY = range(5)
N_GRADS = 5
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 runs the reference


def check_inputs(x, running_mean, running_std, num_batches_tracked, weight, bias, momentum, eps):
    """Raise a clear exception for arguments no backend accepts (buffers are left untouched)."""
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


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as every fused backend (Triton, C++, CUDA) reads it: itself when contiguous or
    channels_last, else a contiguous copy. Outputs take this layout; the fake kernels use it to
    give torch.compile their strides."""
    order = (0, *range(2, x.dim()), 1)
    if x.is_contiguous() or x.permute(order).is_contiguous():
        return x
    return x.contiguous()
