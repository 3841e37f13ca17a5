"""The C++ (CPU) and CUDA C++ extensions: loading, and the autograd glue around their ops.

The extensions register operators in the `speckle_kernels` torch library (csrc/*_api.cpp):
batch_renorm_forward / batch_renorm_backward, add_speckle_noise, make_noisy_batch. This module
loads the built shared objects (speckle_kernels/_C*.so, placed by `pip install -e .` or a normal
install), exposes HAS_CPU_EXT / HAS_CUDA_EXT, and wraps the ops in the functions the
dispatchers call. Without a built extension the package still imports; one warning says why.
"""
from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

from ._backend import kernel_input
from .reference import RenormSchedule

_HERE = os.path.dirname(os.path.abspath(__file__))


def _find(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def _load(name: str) -> tuple[bool, str | None]:
    path = _find(name)
    if path is None:
        return False, f"{name} is not built"
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as err:  # built against another torch, missing symbols...
        return False, f"{os.path.basename(path)} failed to load: {err}"
    return True, None


HAS_CPU_EXT, _cpu_error = _load("_C")
HAS_CUDA_EXT = False
if HAS_CPU_EXT and torch.cuda.is_available():  # the CUDA library adds kernels to _C's schemas
    HAS_CUDA_EXT, _cuda_error = _load("_C_cuda")
if not HAS_CPU_EXT:
    warnings.warn(f"speckle_kernels: C++ extension unavailable ({_cpu_error}); backend='auto' "
                  "uses the reference on CPU. Build it with `pip install --no-build-isolation -e .`",
                  RuntimeWarning, stacklevel=2)


def _schedule(s: RenormSchedule) -> list[float]:
    return [float(s.slope), float(s.start), float(s.low), float(s.high)]


class BatchRenormExtFunction(torch.autograd.Function):
    """y = batch_renorm(x) through the extension's ops; saves x and the (8, C) fp32 stats."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked,
                training, momentum, eps, r_max, d_max):
        y, stats = torch.ops.speckle_kernels.batch_renorm_forward(
            x, weight, bias, running_mean, running_std, num_batches_tracked, training,
            momentum, eps, _schedule(r_max), _schedule(d_max))
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
    """Batch renormalization through the C++/CUDA kernels (semantics of
    reference.batch_renorm_reference); updates the running buffers in place when training."""
    return BatchRenormExtFunction.apply(x, weight, bias, running_mean, running_std,
                                        num_batches_tracked, bool(training), float(momentum),
                                        float(eps), r_max, d_max)


def cpu_output_cache_idle_bytes() -> int:
    """Bytes of released CPU kernel outputs kept for reuse (csrc/cpu/output_cache.cpp: outputs of
    1 MB and more; SPECKLE_CPU_OUTPUT_CACHE_MB caps them, default 1024, 0 turns the cache off)."""
    return int(torch.ops.speckle_kernels.cpu_output_cache_idle_bytes()) if HAS_CPU_EXT else 0


def empty_cpu_output_cache() -> int:
    """Free the idle buffers of the CPU output cache; returns the bytes freed."""
    return int(torch.ops.speckle_kernels.empty_cpu_output_cache()) if HAS_CPU_EXT else 0


def _noise_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip):
    low, high = sigma_mult if isinstance(sigma_mult, (tuple, list)) else (sigma_mult, sigma_mult)
    if distribution not in ("gaussian", "rayleigh"):
        raise ValueError(f"distribution must be 'gaussian' or 'rayleigh', got {distribution!r}")
    return (int(seed), int(offset), float(factor), float(low), float(high), float(sigma_add),
            distribution == "rayleigh", bool(clip))


def add_speckle_noise(x: torch.Tensor, *, factor: float = 1.0, sigma_mult=0.1,
                      sigma_add: float = 0.02, distribution: str = "gaussian", clip: bool = True,
                      seed: int = 0, offset: int = 0) -> torch.Tensor:
    """noise.add_speckle_noise's stream (same seed/offset -> same numbers) in C++/CUDA."""
    return torch.ops.speckle_kernels.add_speckle_noise(
        x, *_noise_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip))


def make_noisy_batch(clean_u8: torch.Tensor, *, factor: float = 1.0, sigma_mult=0.1,
                     sigma_add: float = 0.02, distribution: str = "gaussian", seed: int = 0,
                     offset: int = 0, out_dtype: torch.dtype = torch.float32, clip: bool = True):
    """noise.make_noisy_batch in C++/CUDA: uint8 (N, C, H, W) -> (noisy, clean) in out_dtype."""
    return torch.ops.speckle_kernels.make_noisy_batch(
        clean_u8, *_noise_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip),
        out_dtype)


# Fake (meta) kernels: shapes, dtypes and layouts of the ops' outputs, so that torch.compile
# (fullgraph) traces through the C++/CUDA ops instead of breaking the graph on them.
if HAS_CPU_EXT:
    @torch.library.register_fake("speckle_kernels::batch_renorm_forward")
    def _(x, weight, bias, running_mean, running_std, num_batches_tracked, training, momentum,
          eps, r_max, d_max):
        return torch.empty_like(kernel_input(x)), x.new_empty((8, x.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("speckle_kernels::batch_renorm_backward")
    def _(dy, x, weight, stats, training):
        c = x.shape[1]
        return (torch.empty_like(kernel_input(x)), x.new_empty((c,), dtype=torch.float32),
                x.new_empty((c,), dtype=torch.float32))

    @torch.library.register_fake("speckle_kernels::add_speckle_noise")
    def _(x, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("speckle_kernels::make_noisy_batch")
    def _(clean_u8, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip, out_dtype):
        shape = clean_u8.shape
        return (clean_u8.new_empty(shape, dtype=out_dtype), clean_u8.new_empty(shape, dtype=out_dtype))
