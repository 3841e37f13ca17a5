"""The C++ CPU / CUDA speckle-noise ops (csrc/cpu/speckle_noise_cpu.cpp, csrc/cuda/speckle_noise.cu):
the calls the dispatcher makes, and their fake kernels for torch.compile.

Same stream as the Triton kernel (noise_stream.py): same (seed, offset) -> same numbers, up to
the last bits of log and cos.
"""
from __future__ import annotations

import torch

from . import _ext
from .noise_stream import DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT, DISTRIBUTIONS


def _op_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip):
    low, high = sigma_mult if isinstance(sigma_mult, (tuple, list)) else (sigma_mult, sigma_mult)
    if distribution not in DISTRIBUTIONS:  # the op takes a flag: any other name would be gaussian
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return (int(seed), int(offset), float(factor), float(low), float(high), float(sigma_add),
            distribution == "rayleigh", bool(clip))


def add_speckle_noise(x: torch.Tensor, *, factor: float = 1.0, sigma_mult=DEFAULT_SIGMA_MULT,
                      sigma_add: float = DEFAULT_SIGMA_ADD, distribution: str = "gaussian",
                      clip: bool = True, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """noise.add_speckle_noise on the extension, without the Python checks: the op checks
    what it needs itself (the tests call it directly to see that it does)."""
    return torch.ops.speckle_kernels.add_speckle_noise(
        x.contiguous(), *_op_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip))


def make_noisy_batch(clean_u8: torch.Tensor, *, factor: float = 1.0, sigma_mult=DEFAULT_SIGMA_MULT,
                     sigma_add: float = DEFAULT_SIGMA_ADD, distribution: str = "gaussian",
                     seed: int = 0, offset: int = 0, out_dtype: torch.dtype = torch.float32,
                     clip: bool = True):
    """uint8 (N, C, H, W) -> (noisy, clean) in out_dtype."""
    return torch.ops.speckle_kernels.make_noisy_batch(
        clean_u8.contiguous(), *_op_args(factor, sigma_mult, sigma_add, distribution, seed, offset, clip),
        out_dtype)


def _register_fake_kernels():  # once the ops exist (_ext.on_cpu_load)
    @torch.library.register_fake("speckle_kernels::add_speckle_noise")
    def _(x, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("speckle_kernels::make_noisy_batch")
    def _(clean_u8, seed, offset, factor, sigma_low, sigma_high, sigma_add, rayleigh, clip, out_dtype):
        shape = clean_u8.shape
        return (clean_u8.new_empty(shape, dtype=out_dtype), clean_u8.new_empty(shape, dtype=out_dtype))


_ext.on_cpu_load(_register_fake_kernels)
