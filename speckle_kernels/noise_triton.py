"""Speckle noise in one fused, counter-based Triton kernel (the stream of noise_stream.py).

Grid (images, blocks per image); program (i, b) handles elements [b*BLOCK, (b+1)*BLOCK) of
image i, draws the image's sigma once (a scalar Philox) and one Philox call per element.
make_noisy_batch uses the same kernel with a uint8 input: one read of the bytes, two writes
(noisy and clean, both normalized as (v - 0.5) / 0.5, v = u8 / 255). Philox costs ~40 integer
multiplies per element; on a GPU the kernel sits near the memory bound for fp32 output and can
become integer-bound for bf16 output (5 bytes per element).
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON
from .noise_stream import RAYLEIGH_MEAN, RAYLEIGH_STD, TINY_UNIFORM, images_of
from .philox import STREAM_SIGMA

_MAX_GRID_Y = 65535

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import uniform

    # Kernels may only read globals that are tl.constexpr.
    _SIGMA_STREAM = tl.constexpr(STREAM_SIGMA)
    _TINY_UNIFORM = tl.constexpr(TINY_UNIFORM)
    _RAYLEIGH_MEAN = tl.constexpr(RAYLEIGH_MEAN)
    _INV_RAYLEIGH_STD = tl.constexpr(1.0 / RAYLEIGH_STD)
    _TWO_PI = tl.constexpr(6.283185307179586)

    @triton.jit
    def speckle_kernel(
        x_ptr,        # (images * numel_img,) float or uint8 input, contiguous
        y_ptr,        # (images * numel_img,) noisy output
        clean_ptr,    # (images * numel_img,) normalized clean output (FROM_U8 only)
        numel_img, seed, offset,
        factor, sig_lo, sig_span, sigma_add,
        BLOCK: tl.constexpr, RAYLEIGH: tl.constexpr, PER_IMAGE: tl.constexpr,
        CLIP: tl.constexpr, FROM_U8: tl.constexpr,
    ):
        img = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = k < numel_img
        first = img * numel_img
        j = first + k
        if PER_IMAGE:
            e_img = offset + first
            lo = e_img.to(tl.uint32)
            hi = (e_img >> 32).to(tl.uint32)
            zero = lo * 0
            ri, _, _, _ = tl.philox(seed, lo, hi, zero, zero + _SIGMA_STREAM)
            sigma = sig_lo + sig_span * uniform(ri)
        else:
            sigma = sig_lo
        fs = factor * sigma

        r0, r1, r2, r3 = tl.randint4x(seed, offset + j)   # counter (e lo, e hi, 0, 0)
        rho0 = tl.sqrt(-2.0 * tl.log(tl.maximum(uniform(r0), _TINY_UNIFORM)))
        if RAYLEIGH:
            n1 = (rho0 - _RAYLEIGH_MEAN) * _INV_RAYLEIGH_STD
        else:
            n1 = rho0 * tl.cos(uniform(r1) * _TWO_PI)
        rho2 = tl.sqrt(-2.0 * tl.log(tl.maximum(uniform(r2), _TINY_UNIFORM)))
        n2 = rho2 * tl.cos(uniform(r3) * _TWO_PI)

        x = tl.load(x_ptr + j, mask=mask, other=0)
        if FROM_U8:
            v = x.to(tl.float32) / 255.0
        else:
            v = x.to(tl.float32)
        y = v * (1.0 + fs * n1) + sigma_add * n2
        if CLIP:
            y = tl.minimum(tl.maximum(y, 0.0), 1.0)
        if FROM_U8:
            tl.store(y_ptr + j, (2.0 * y - 1.0).to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(clean_ptr + j, (2.0 * v - 1.0).to(clean_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptr + j, y.to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x, y, clean, *, factor, sigma_mult, sigma_add, distribution, clip, seed, offset,
            block=None):
    images, numel_img = images_of(x)
    if x.numel() == 0:
        return
    if block is None:
        # One program per image under the interpreter (it pays per program, not per element).
        cap = 1 << 16 if x.device.type == "cpu" else 1024
        block = min(cap, triton.next_power_of_2(numel_img))
    block = max(block, triton.next_power_of_2(triton.cdiv(numel_img, _MAX_GRID_Y)))
    low, high = sigma_mult
    grid = (images, triton.cdiv(numel_img, block))
    speckle_kernel[grid](
        x, y, clean if clean is not None else y, numel_img, seed, offset,
        factor, low, high - low, sigma_add,
        BLOCK=block, RAYLEIGH=distribution == "rayleigh", PER_IMAGE=high > low,
        CLIP=bool(clip), FROM_U8=clean is not None, num_warps=4)


def add_speckle_noise(x: torch.Tensor, *, block: int | None = None, **noise) -> torch.Tensor:
    """The checked arguments of noise.add_speckle_noise (factor, sigma_mult as (low, high),
    sigma_add, distribution, clip, seed, offset) -> the noisy tensor, contiguous, in x's dtype."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _launch(xc, y, None, block=block, **noise)
    return y


def make_noisy_batch(clean_u8: torch.Tensor, *, out_dtype: torch.dtype, block: int | None = None,
                     **noise):
    """uint8 images -> (noisy, clean) in out_dtype in one launch."""
    src = clean_u8.contiguous()
    noisy = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    clean = torch.empty_like(noisy)
    _launch(src, noisy, clean, block=block, **noise)
    return noisy, clean
