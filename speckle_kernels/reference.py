"""Plain-PyTorch references: the oracle of every test and the baseline of every benchmark.

Each function here computes the same thing as a fused kernel of the package, written with
ordinary torch ops so that autograd does the backward. They favour clarity over speed.

Batch renormalization (Ioffe 2017), with the conventions of the third-party layer the paper
used (github.com/ludvb/batchrenorm): eps is added to the *standard deviation*, the running
statistics are a mean and a std, r and d are computed from the running statistics *before*
this step's update and carry no gradient:

    sigma = sqrt(var_biased(x)) + eps
    r = clamp(sigma / running_std, 1/r_max, r_max)           (no grad)
    d = clamp((mu - running_mean) / running_std, -d_max, d_max)  (no grad)
    y = weight * ((x - mu) / sigma * r + d) + bias
    eval: y = weight * (x - running_mean) / running_std + bias

One deliberate difference from the third-party layer: where a channel has zero variance
(a single value per channel, or a constant channel) the gradient through sqrt(var) is
taken as 0 instead of NaN (0/0), so the layer stays finite on degenerate batches.
"""
from __future__ import annotations

import math

import torch

from .batch_renorm_act_contract import check_block_args, dropout_keep_mask
from .noise_stream import RAYLEIGH_MEAN, RAYLEIGH_STD, TINY_UNIFORM, check_counter, check_distribution
from .philox import STREAM_NOISE, STREAM_SIGMA, U32, philox4x32_10, uniform_torch
from .schedules import DMAX_SCHEDULE, RMAX_SCHEDULE, RenormSchedule, renorm_correction, update_running_stats


def _channel_view_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _sqrt_zero_grad_at_zero(var: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; the double where keeps both the value and the
    # gradient finite (gradient 0) without a host-side branch.
    positive = var > 0
    safe = torch.where(positive, var, torch.ones_like(var))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(var))


def batch_renorm_reference(
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
    upcast: bool = True,
) -> torch.Tensor:
    """Batch renormalization of x (N, C, *) in plain torch ops; updates the buffers in place.

    upcast=True computes in float32 (float64 input stays float64) and returns x's dtype,
    as the fused kernels do; upcast=False computes in x's own dtype like the third-party layer.
    """
    out_dtype = x.dtype
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    shape = _channel_view_shape(x)
    rm = running_mean.to(x.dtype).view(shape)
    rs = running_std.to(x.dtype).view(shape)
    if training:
        dims = _reduce_dims(x)
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        std = _sqrt_zero_grad_at_zero(var) + eps
        r, d = renorm_correction(mean.detach(), std.detach(), rm, rs, num_batches_tracked, r_max, d_max)
        xhat = (x - mean) / std * r + d
        update_running_stats(mean.detach(), std.detach(), running_mean, running_std, num_batches_tracked,
                             momentum)
    else:
        xhat = (x - rm) / rs
    if weight is not None:
        xhat = weight.to(x.dtype).view(shape) * xhat
    if bias is not None:
        xhat = xhat + bias.to(x.dtype).view(shape)
    return xhat.to(out_dtype)


# =============================================================================================
# Speckle noise (the plain-torch twin of speckle_kernels/noise.py)
# =============================================================================================
# y = x * (1 + factor * sigma * n1) + sigma_add * n2, clipped to [0, 1] when clip; n2 ~ N(0, 1),
# n1 ~ N(0, 1) or a standardized Rayleigh variable (R - sqrt(pi/2)) / sqrt(2 - pi/2),
# R = sqrt(-2 ln U). sigma_mult: a number or (low, high), one uniform draw per image (first dim).
# Drawn from torch's generator: the same distribution as the kernels' counter-based stream
# (noise_stream.py), not the same numbers. It is the benchmark baseline and the statistical
# oracle; the stream itself, in torch integer arithmetic, is the last section of this file.

def _noise_sigma(x: torch.Tensor, sigma_mult, generator) -> torch.Tensor | float:
    low, high = (sigma_mult if isinstance(sigma_mult, (tuple, list)) else (sigma_mult, sigma_mult))
    if high == low:
        return float(low)
    images = x.shape[0] if x.dim() >= 2 else 1
    u = torch.rand(images, generator=generator, device=x.device, dtype=torch.float32)
    return (low + (high - low) * u).view([images] + [1] * (x.dim() - 1) if x.dim() >= 2 else [])


def _standard_noise(x: torch.Tensor, distribution: str, generator):
    shape, dev = x.shape, x.device
    if distribution == "rayleigh":
        u = torch.rand(shape, generator=generator, device=dev, dtype=torch.float32)
        r = torch.sqrt(-2.0 * torch.log1p(-u))       # Rayleigh(1); 1 - u lies in (0, 1]
        n1 = (r - RAYLEIGH_MEAN) / RAYLEIGH_STD
    elif distribution == "gaussian":
        n1 = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    else:
        raise ValueError(f"distribution must be 'gaussian' or 'rayleigh', got {distribution!r}")
    n2 = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    return n1, n2


def speckle_noise_reference(x: torch.Tensor, *, factor: float = 1.0, sigma_mult=0.1,
                            sigma_add: float = 0.02, distribution: str = "gaussian",
                            clip: bool = True,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """Speckle noise on intensities x in [0, 1]; computed in float32 (float64 for float64 x),
    returned in x's dtype."""
    n1, n2 = _standard_noise(x, distribution, generator)
    sigma = _noise_sigma(x, sigma_mult, generator)
    v = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = v * (1 + factor * sigma * n1) + sigma_add * n2
    if clip:
        y = y.clamp(0.0, 1.0)
    return y.to(x.dtype)


def noisy_batch_reference(clean_u8: torch.Tensor, *, factor: float = 1.0, sigma_mult=0.1,
                          sigma_add: float = 0.02, distribution: str = "gaussian",
                          out_dtype: torch.dtype = torch.float32, clip: bool = True,
                          generator: torch.Generator | None = None):
    """uint8 images -> (noisy, clean), both normalized as (v - 0.5) / 0.5 with v = u8 / 255."""
    v = clean_u8.to(torch.float32) / 255.0
    y = speckle_noise_reference(v, factor=factor, sigma_mult=sigma_mult, sigma_add=sigma_add,
                                distribution=distribution, clip=clip, generator=generator)
    return ((y - 0.5) / 0.5).to(out_dtype), ((v - 0.5) / 0.5).to(out_dtype)


# =============================================================================================
# The counter-based noise stream in plain torch integer arithmetic (noise_stream.py's layout):
# the oracle of every noise kernel's bits.
# =============================================================================================

def _radius_torch(u: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(-2.0 * torch.log(torch.clamp(u, min=TINY_UNIFORM)))


def noise_fields(numel: int, *, seed: int = 0, offset: int = 0, distribution: str = "gaussian",
                 device="cpu"):
    """(n1, n2), float32 of length numel: the kernel's noise for flat indices 0..numel-1,
    computed from the counter layout in the module header with torch integer ops. Equal to the
    kernel's up to the last ulp of log/cos; meant for tests and as the oracle of a port."""
    check_distribution(distribution)
    seed, offset = check_counter("seed", seed), check_counter("offset", offset)
    e = offset + torch.arange(numel, dtype=torch.int64, device=device)
    zero = torch.zeros_like(e)
    r0, r1, r2, r3 = philox4x32_10(seed, e & U32, e >> 32, zero, zero + STREAM_NOISE)
    rho0 = _radius_torch(uniform_torch(r0))
    if distribution == "rayleigh":
        n1 = (rho0 - RAYLEIGH_MEAN) * (1.0 / RAYLEIGH_STD)
    else:
        n1 = rho0 * torch.cos(2 * math.pi * uniform_torch(r1))
    n2 = _radius_torch(uniform_torch(r2)) * torch.cos(2 * math.pi * uniform_torch(r3))
    return n1, n2


def image_uniforms(images: int, numel_per_image: int, *, seed: int = 0, offset: int = 0,
                   device="cpu") -> torch.Tensor:
    """The per-image uniforms u_i (float32) that pick sigma_i = low + (high - low) * u_i."""
    seed, offset = check_counter("seed", seed), check_counter("offset", offset)
    e = offset + torch.arange(images, dtype=torch.int64, device=device) * numel_per_image
    zero = torch.zeros_like(e)
    r0, _, _, _ = philox4x32_10(seed, e & U32, e >> 32, zero, zero + STREAM_SIGMA)
    return uniform_torch(r0)


# =============================================================================================
# The norm block (BatchRenorm -> activation -> dropout): the composition a fused block must
# equal, with a counter-based dropout mask that a kernel can regenerate in its backward.
# =============================================================================================
# Mask stream: element j of a call (row-major index of the logical shape, whatever the memory
# layout) has the 64-bit counter e = offset + j. One Philox4x32-10 call, key = seed (lo, hi
# words) and counter (q & 0xFFFFFFFF, q >> 32, 0, 2) with q = e >> 2, gives four words: element
# e takes word e & 3 (four elements a call: Philox is the costly part of a dropout kernel).
# The element is kept when u >= float32(p), u the word's uniform (noise_stream.py's: the word
# as int32, folded to [0, 2**31) by ~ where negative, times UNIFORM_SCALE, in float32). Word
# c3 = 2 keeps the mask apart from the noise streams (c3 = 0 and 1). Kept values are scaled by
# float32(1 / (1 - p)), as nn.Dropout does; eval mode and p = 0 keep everything. seed and
# offset may be int64 tensors (the modules keep them on the device, so that the offset can
# advance without a host sync).

def batch_renorm_act_reference(x, running_mean, running_std, num_batches_tracked, weight=None, bias=None, *,
                               training: bool = True, momentum: float = 0.01, eps: float = 1e-3,
                               r_max: RenormSchedule = RMAX_SCHEDULE, d_max: RenormSchedule = DMAX_SCHEDULE,
                               activation: str = "leaky_relu", negative_slope: float = 0.1,
                               dropout: float = 0.0, seed=0, offset=0) -> torch.Tensor:
    """batch_renorm_reference, then the activation, then dropout with dropout_keep_mask."""
    check_block_args(activation, negative_slope, dropout)
    y = batch_renorm_reference(x, running_mean, running_std, num_batches_tracked, weight, bias,
                               training=training, momentum=momentum, eps=eps, r_max=r_max, d_max=d_max)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "leaky_relu":
        y = torch.nn.functional.leaky_relu(y, negative_slope)
    if training and dropout > 0.0:
        keep = dropout_keep_mask(tuple(y.shape), dropout, seed=seed, offset=offset, device=y.device)
        keep = torch.empty_like(y, dtype=torch.bool).copy_(keep)  # y's memory layout
        # 1/(1-p) rounds to y's dtype: float32(1/(1-p)) for every kernel dtype, as keep_scale
        y = torch.where(keep, y * (1.0 / (1.0 - dropout)), torch.zeros_like(y))
    return y
