"""Speckle noise: the public functions, their input checks and the dispatcher.

    add_speckle_noise(x, factor=1, sigma_mult=0.1, sigma_add=0.02, distribution="gaussian", ...)
    make_noisy_batch(clean_u8, ...) -> (noisy, clean), both normalized as (v - 0.5) / 0.5

The model, the defaults and the counter-based stream are in noise_stream.py; the kernels in
noise_triton.py (Triton) and csrc/ (C++ CPU and CUDA, through noise_ext.py); the plain-torch
reference in reference.py. backend="auto" picks the C++/CUDA extension, then Triton, then the
reference (the rule of _backend.py).
"""
from __future__ import annotations

import torch

from . import noise_ext, noise_triton
from ._backend import choose_backend
from .noise_stream import (BATCH_OUT_DTYPES, DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT, DISTRIBUTIONS,
                           KERNEL_DTYPES, check_noise_args)

__all__ = ["add_speckle_noise", "make_noisy_batch", "DEFAULT_SIGMA_MULT", "DEFAULT_SIGMA_ADD",
           "DISTRIBUTIONS"]


def _mix_seed(seed: int, offset: int) -> int:
    """splitmix64 of (seed, offset): a seed for the reference's torch.Generator."""
    z = (seed * 0x9E3779B97F4A7C15 + offset + 0x632BE59BD9B4E019) & (2 ** 64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2 ** 64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2 ** 64 - 1)
    return (z ^ (z >> 31)) & (2 ** 63 - 1)


def _reference_generator(device, seed, offset):
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix_seed(seed, offset))
    return gen


def _checked(factor, sigma_mult, sigma_add, distribution, seed, offset, clip) -> dict:
    factor, sigmas, sigma_add, distribution, seed, offset = check_noise_args(
        factor, sigma_mult, sigma_add, distribution, seed, offset)
    return dict(factor=factor, sigma_mult=sigmas, sigma_add=sigma_add, distribution=distribution,
                clip=bool(clip), seed=seed, offset=offset)


def add_speckle_noise(x: torch.Tensor, *, factor: float = 1.0, sigma_mult=DEFAULT_SIGMA_MULT,
                      sigma_add: float = DEFAULT_SIGMA_ADD, distribution: str = "gaussian",
                      clip: bool = True, seed: int = 0, offset: int = 0,
                      backend: str = "auto", _block: int | None = None) -> torch.Tensor:
    """Return x * (1 + factor * sigma * n1) + sigma_add * n2 (see noise_stream.py).

    x: float tensor of intensities in [0, 1], any shape; the first dimension indexes images when
    x has 2 or more dimensions. The result has x's shape and dtype (contiguous). Counter-based
    noise: the same (seed, offset) give the same bits on any launch configuration; the
    "reference" backend draws from torch's generator instead (same distribution, other numbers).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of intensities, got dtype {x.dtype}")
    noise = _checked(factor, sigma_mult, sigma_add, distribution, seed, offset, clip)
    chosen = choose_backend(backend, x.device, x.dtype, kernel_dtypes=KERNEL_DTYPES)
    if chosen == "reference":
        from .reference import speckle_noise_reference
        seed, offset = noise.pop("seed"), noise.pop("offset")
        return speckle_noise_reference(x, generator=_reference_generator(x.device, seed, offset), **noise)
    if chosen in ("cpu", "cuda"):
        return noise_ext.add_speckle_noise(x, **noise)
    return noise_triton.add_speckle_noise(x, block=_block, **noise)


def make_noisy_batch(clean_u8: torch.Tensor, *, factor: float = 1.0,
                     sigma_mult=DEFAULT_SIGMA_MULT, sigma_add: float = DEFAULT_SIGMA_ADD,
                     distribution: str = "gaussian", seed: int = 0, offset: int = 0,
                     out_dtype: torch.dtype = torch.float32, clip: bool = True,
                     backend: str = "auto", _block: int | None = None):
    """uint8 images (N, C, H, W) (C = 1 for the ultrasound data) -> (noisy, clean).

    Both outputs are normalized as (v - 0.5) / 0.5 with v = u8 / 255, in out_dtype; noisy is
    add_speckle_noise(v, ...) with the same counters (so the same noise as that call on v).
    On the Triton backend this is one launch: one read of the bytes, two writes.
    """
    if not isinstance(clean_u8, torch.Tensor):
        raise TypeError(f"clean_u8 must be a torch.Tensor, got {type(clean_u8).__name__}")
    if clean_u8.dtype != torch.uint8:
        raise TypeError(f"clean_u8 must have dtype torch.uint8, got {clean_u8.dtype}")
    if clean_u8.dim() != 4:
        raise ValueError(f"clean_u8 must be 4-d (N, 1, H, W), got shape {tuple(clean_u8.shape)}")
    if out_dtype not in BATCH_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {BATCH_OUT_DTYPES}, got {out_dtype!r}")
    noise = _checked(factor, sigma_mult, sigma_add, distribution, seed, offset, clip)
    chosen = choose_backend(backend, clean_u8.device)
    if chosen == "reference":
        from .reference import noisy_batch_reference
        seed, offset = noise.pop("seed"), noise.pop("offset")
        return noisy_batch_reference(clean_u8, out_dtype=out_dtype,
                                     generator=_reference_generator(clean_u8.device, seed, offset), **noise)
    if chosen in ("cpu", "cuda"):
        return noise_ext.make_noisy_batch(clean_u8, out_dtype=out_dtype, **noise)
    return noise_triton.make_noisy_batch(clean_u8, out_dtype=out_dtype, block=_block, **noise)
