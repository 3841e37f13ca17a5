"""The speckle-noise contract every backend follows: the model, its defaults, the argument
checks and the counter-based random stream.

Model (the paper's two-step noise, section 2.1 "Ajout du bruit"): on intensities x in [0, 1]

    y = x * (1 + factor * sigma_mult * n1) + sigma_add * n2,      clipped to [0, 1] when clip,

n2 ~ N(0, 1); n1 ~ N(0, 1) ("gaussian") or a standardized Rayleigh variable ("rayleigh"):
n1 = (R - sqrt(pi/2)) / sqrt(2 - pi/2) with R = sqrt(-2 ln U) ~ Rayleigh(1), so both choices
have mean 0 and variance 1 (the Rayleigh one has skewness 2 sqrt(pi) (pi - 3) / (4 - pi)^1.5
~= 0.631). sigma_mult is one number, or a pair (low, high) from which every image (index along
the first dimension; a 0-d or 1-d tensor is one image) draws its own sigma uniformly.

Defaults, from the paper. It names sigma in [0.1, 0.75] (after Karaoglu et al.) and
multiplication factors 1, 5 and 10 for the multiplicative part, but no value for the additive
part. DEFAULT_SIGMA_MULT = 0.1, the low end of that range, so the three factors give effective
multiplicative sigmas 0.1, 0.5 and 1.0, which span the paper's range (a little beyond at x10).
DEFAULT_SIGMA_ADD = 0.02 (about 5 gray levels of 255): our choice, a small electronic-noise
floor that keeps dark (anechoic) regions from being noise-free; the paper gives no number.

Random numbers: counter-based, Philox4x32-10 (philox.py: its constants, the stream words, the
uniform map, the generator in torch ops), the generator behind tl.rand/tl.randn/tl.randint4x.
Every value depends only on (seed, offset, flat index), never on
the launch configuration, so the Triton, C++ CPU and CUDA kernels give the same stream:

    key       k0 = seed & 0xFFFFFFFF,  k1 = seed >> 32              (0 <= seed < 2**63)
    element   e = offset + j, j the row-major flat index of the element in this call's tensor
              counter (c0, c1, c2, c3) = (e & 0xFFFFFFFF, e >> 32, 0, STREAM_NOISE = 0) -> words r0..r3
    uniform   u(r) = float32(v) * 4.6566127342e-10f, v = r if r < 2**31 else 2**32 - 1 - r
              (Triton's uint_to_uniform_float; u in [0, 1), 2**31 levels)
    n1        rho0 = sqrt(-2 ln max(u(r0), 1e-7))
              gaussian: n1 = rho0 * cos(2 pi u(r1));  rayleigh: n1 = (rho0 - sqrt(pi/2)) / sqrt(2 - pi/2)
    n2        n2 = sqrt(-2 ln max(u(r2), 1e-7)) * cos(2 pi u(r3))          (always gaussian)
    image i   (only when sigma_mult is a pair) e_i = offset + i * numel_per_image,
              counter (e_i & 0xFFFFFFFF, e_i >> 32, 0, STREAM_SIGMA = 1); sigma_i = low + (high - low) * u(r0)

All arithmetic after the Philox words is float32. Word c3 = 1 separates the per-image stream
from the element stream; r1 is unused by the Rayleigh variant (kept so both variants read the
same words). Splitting a batch: images [k:N] called with offset + k * numel_per_image give the
same bits as rows k: of the whole call. reference.noise_fields / reference.image_uniforms are
this description in plain torch integer arithmetic: its executable form, and the tests' oracle.
"""
from __future__ import annotations

import math
import numbers

import torch

DEFAULT_SIGMA_MULT = 0.1
DEFAULT_SIGMA_ADD = 0.02
DISTRIBUTIONS = ("gaussian", "rayleigh")

INT64_LIMIT = 2 ** 63
TINY_UNIFORM = 1.0e-7
RAYLEIGH_MEAN = math.sqrt(math.pi / 2)       # the mean of Rayleigh(1)
RAYLEIGH_STD = math.sqrt(2 - math.pi / 2)    # its standard deviation

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BATCH_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_number(name, value, *, minimum=0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_sigma_mult(sigma_mult) -> tuple[float, float]:
    """-> (low, high); a number gives low == high."""
    if isinstance(sigma_mult, (tuple, list)):
        if len(sigma_mult) != 2:
            raise ValueError(f"sigma_mult pair must be (low, high), got {sigma_mult!r}")
        low = check_number("sigma_mult low", sigma_mult[0])
        high = check_number("sigma_mult high", sigma_mult[1])
        if high < low:
            raise ValueError(f"sigma_mult (low, high) needs low <= high, got {sigma_mult!r}")
        return low, high
    value = check_number("sigma_mult", sigma_mult)
    return value, value


def check_counter(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < INT64_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value!r}")
    return int(value)


def check_distribution(distribution) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def check_noise_args(factor, sigma_mult, sigma_add, distribution, seed, offset):
    """-> (factor, (low, high), sigma_add, distribution, seed, offset), each checked."""
    return (check_number("factor", factor), check_sigma_mult(sigma_mult),
            check_number("sigma_add", sigma_add), check_distribution(distribution),
            check_counter("seed", seed), check_counter("offset", offset))


def images_of(t: torch.Tensor) -> tuple[int, int]:
    """(images, numel per image): the first dimension indexes images; 0-d/1-d is one image."""
    if t.dim() >= 2:
        images = t.shape[0]
        return images, (t.numel() // images if images else 0)
    return 1, t.numel()
