"""Speckle noise in one fused, counter-based Triton kernel.

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

Random numbers: counter-based, Philox4x32-10 (Salmon et al., SC'11), the generator behind
tl.rand/tl.randn/tl.randint4x. Every value depends only on (seed, offset, flat index), never on
the launch configuration, so a C++ CPU/CUDA port can reproduce it from this description:

    key       k0 = seed & 0xFFFFFFFF,  k1 = seed >> 32              (0 <= seed < 2**63)
    element   e = offset + j, j the row-major flat index of the element in this call's tensor
              counter (c0, c1, c2, c3) = (e & 0xFFFFFFFF, e >> 32, 0, 0)   -> words r0 r1 r2 r3
    uniform   u(r) = float32(v) * 4.6566127342e-10f, v = r if r < 2**31 else 2**32 - 1 - r
              (Triton's uint_to_uniform_float; u in [0, 1), 2**31 levels)
    n1        rho0 = sqrt(-2 ln max(u(r0), 1e-7))
              gaussian: n1 = rho0 * cos(2 pi u(r1));  rayleigh: n1 = (rho0 - sqrt(pi/2)) / sqrt(2 - pi/2)
    n2        n2 = sqrt(-2 ln max(u(r2), 1e-7)) * cos(2 pi u(r3))          (always gaussian)
    image i   (only when sigma_mult is a pair) e_i = offset + i * numel_per_image,
              counter (e_i & 0xFFFFFFFF, e_i >> 32, 0, 1); sigma_i = low + (high - low) * u(r0)

All arithmetic after the Philox words is float32. Word c3 = 1 separates the per-image stream
from the element stream; r1 is unused by the Rayleigh variant (kept so both variants read the
same words). Splitting a batch: images [k:N] called with offset + k * numel_per_image give the
same bits as rows k: of the whole call. `noise_fields` and `image_uniforms` below are the same
stream written in plain torch integer arithmetic: the executable form of this description.

Kernel layout: grid (images, blocks per image); program (i, b) handles elements
[b*BLOCK, (b+1)*BLOCK) of image i, draws the image's sigma once (a scalar Philox) and one
Philox call per element. make_noisy_batch uses the same kernel with a uint8 input: one read of
the bytes, two writes (noisy and clean, both normalized as (v - 0.5) / 0.5, v = u8 / 255).
Philox costs ~40 integer multiplies per element; on a GPU the kernel sits near the memory
bound for fp32 output and can become integer-bound for bf16 output (5 bytes per element).
"""
from __future__ import annotations

import math
import numbers

import torch

from ._backend import HAS_TRITON, check_backend_name, resolve_backend

try:  # the C++/CUDA extension is optional; the package falls back without it
    from . import _ext
except Exception:  # pragma: no cover - depends on the build
    _ext = None

DEFAULT_SIGMA_MULT = 0.1
DEFAULT_SIGMA_ADD = 0.02
DISTRIBUTIONS = ("gaussian", "rayleigh")

_U32 = 0xFFFFFFFF
_INT64_LIMIT = 2 ** 63
_UNIFORM_SCALE = 4.6566127342e-10
_TINY_UNIFORM = 1.0e-7
_RAYLEIGH_MEAN = math.sqrt(math.pi / 2)
_RAYLEIGH_STD = math.sqrt(2 - math.pi / 2)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BATCH_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_Y = 65535

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _uniform(r):
        # uint32 words -> float32 in [0, 1), as Triton's uint_to_uniform_float.
        v = r.to(tl.int32, bitcast=True)
        v = tl.where(v < 0, ~v, v)
        return v.to(tl.float32) * 4.6566127342e-10

    @triton.jit
    def _speckle_kernel(
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
            ri, _, _, _ = tl.philox(seed, lo, hi, zero, zero + 1)
            sigma = sig_lo + sig_span * _uniform(ri)
        else:
            sigma = sig_lo
        fs = factor * sigma

        r0, r1, r2, r3 = tl.randint4x(seed, offset + j)   # counter (e lo, e hi, 0, 0)
        rho0 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(r0), 1.0e-7)))
        if RAYLEIGH:
            n1 = (rho0 - 1.2533141373155001) * 1.5263997455328482  # (R - sqrt(pi/2)) / sqrt(2 - pi/2)
        else:
            n1 = rho0 * tl.cos(6.283185307179586 * _uniform(r1))
        rho2 = tl.sqrt(-2.0 * tl.log(tl.maximum(_uniform(r2), 1.0e-7)))
        n2 = rho2 * tl.cos(6.283185307179586 * _uniform(r3))

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


def aot_variants():
    """(kernel, signature, constexprs) of every variant the host functions launch, for the
    ahead-of-time compile test (tests/aot_compile.py): float inputs of add_speckle_noise and the
    uint8 -> fp32/bf16 path of make_noisy_batch, both distributions, per-image sigma on."""
    variants = []
    for in_ty, out_ty in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"),
                          ("u8", "fp32"), ("u8", "bf16")):
        for rayleigh in (False, True):
            signature = {"x_ptr": "*" + in_ty, "y_ptr": "*" + out_ty, "clean_ptr": "*" + out_ty,
                         "numel_img": "i32", "seed": "i64", "offset": "i64", "factor": "fp32",
                         "sig_lo": "fp32", "sig_span": "fp32", "sigma_add": "fp32",
                         "BLOCK": "constexpr", "RAYLEIGH": "constexpr", "PER_IMAGE": "constexpr",
                         "CLIP": "constexpr", "FROM_U8": "constexpr"}
            constexprs = {"BLOCK": 1024, "RAYLEIGH": rayleigh, "PER_IMAGE": True, "CLIP": True,
                          "FROM_U8": in_ty == "u8"}
            variants.append((_speckle_kernel, signature, constexprs))
    return variants


# ----------------------------------------------------------------------------- arguments

def _check_number(name, value, *, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _check_sigma_mult(sigma_mult):
    """-> (low, high); a number gives low == high."""
    if isinstance(sigma_mult, (tuple, list)):
        if len(sigma_mult) != 2:
            raise ValueError(f"sigma_mult pair must be (low, high), got {sigma_mult!r}")
        low = _check_number("sigma_mult low", sigma_mult[0])
        high = _check_number("sigma_mult high", sigma_mult[1])
        if high < low:
            raise ValueError(f"sigma_mult (low, high) needs low <= high, got {sigma_mult!r}")
        return low, high
    value = _check_number("sigma_mult", sigma_mult)
    return value, value


def _check_counter(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= int(value) < _INT64_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value!r}")
    return int(value)


def _check_distribution(distribution):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def _check_noise_args(factor, sigma_mult, sigma_add, distribution, seed, offset):
    return (_check_number("factor", factor), _check_sigma_mult(sigma_mult),
            _check_number("sigma_add", sigma_add), _check_distribution(distribution),
            _check_counter("seed", seed), _check_counter("offset", offset))


def _images_of(t: torch.Tensor):
    """(images, numel per image): the first dimension indexes images; 0-d/1-d is one image."""
    if t.dim() >= 2:
        images = t.shape[0]
        return images, (t.numel() // images if images else 0)
    return 1, t.numel()


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


# ----------------------------------------------------------------------------- launch

def _launch(x, y, clean, *, factor, sigmas, sigma_add, distribution, clip, seed, offset,
            block=None):
    images, numel_img = _images_of(x)
    if x.numel() == 0:
        return
    if block is None:
        # One program per image under the interpreter (it pays per program, not per element).
        cap = 1 << 16 if x.device.type == "cpu" else 1024
        block = min(cap, triton.next_power_of_2(numel_img))
    block = max(block, triton.next_power_of_2(triton.cdiv(numel_img, _MAX_GRID_Y)))
    low, high = sigmas
    grid = (images, triton.cdiv(numel_img, block))
    _speckle_kernel[grid](
        x, y, clean if clean is not None else y, numel_img, seed, offset,
        factor, low, high - low, sigma_add,
        BLOCK=block, RAYLEIGH=distribution == "rayleigh", PER_IMAGE=high > low,
        CLIP=bool(clip), FROM_U8=clean is not None, num_warps=4)


# ----------------------------------------------------------------------------- public API

def _resolve(backend: str, device: torch.device) -> str:
    """The dispatcher's rule (see _backend.py) with the C++/CUDA extension when it is built."""
    check_backend_name(backend)
    return resolve_backend(backend, device, has_cpu_ext=_ext is not None and _ext.HAS_CPU_EXT,
                           has_cuda_ext=_ext is not None and _ext.HAS_CUDA_EXT)


def add_speckle_noise(x: torch.Tensor, *, factor: float = 1.0, sigma_mult=DEFAULT_SIGMA_MULT,
                      sigma_add: float = DEFAULT_SIGMA_ADD, distribution: str = "gaussian",
                      clip: bool = True, seed: int = 0, offset: int = 0,
                      backend: str = "auto", _block: int | None = None) -> torch.Tensor:
    """Return x * (1 + factor * sigma * n1) + sigma_add * n2 (see the module header).

    x: float tensor of intensities in [0, 1], any shape; the first dimension indexes images when
    x has 2 or more dimensions. The result has x's shape and dtype (contiguous). Counter-based
    noise: the same (seed, offset) give the same bits on any launch configuration; the
    "reference" backend draws from torch's generator instead (same distribution, other numbers).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of intensities, got dtype {x.dtype}")
    factor, sigmas, sigma_add, distribution, seed, offset = _check_noise_args(
        factor, sigma_mult, sigma_add, distribution, seed, offset)
    chosen = _resolve(backend, x.device)
    if chosen in ("triton", "cpu", "cuda") and x.dtype not in _KERNEL_DTYPES:
        if backend != "auto":
            raise TypeError(f"backend={backend!r} supports {_KERNEL_DTYPES}, got x dtype {x.dtype}")
        chosen = "reference"
    if chosen == "reference":
        from .reference import speckle_noise_reference
        return speckle_noise_reference(
            x, factor=factor, sigma_mult=sigmas, sigma_add=sigma_add, distribution=distribution,
            clip=clip, generator=_reference_generator(x.device, seed, offset))
    if chosen in ("cpu", "cuda"):
        return _ext.add_speckle_noise(x.contiguous(), factor=factor, sigma_mult=sigmas,
                                      sigma_add=sigma_add, distribution=distribution, clip=clip,
                                      seed=seed, offset=offset)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _launch(xc, y, None, factor=factor, sigmas=sigmas, sigma_add=sigma_add,
            distribution=distribution, clip=clip, seed=seed, offset=offset, block=_block)
    return y


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
    if out_dtype not in _BATCH_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_BATCH_OUT_DTYPES}, got {out_dtype!r}")
    factor, sigmas, sigma_add, distribution, seed, offset = _check_noise_args(
        factor, sigma_mult, sigma_add, distribution, seed, offset)
    chosen = _resolve(backend, clean_u8.device)
    if chosen in ("cpu", "cuda"):
        return _ext.make_noisy_batch(clean_u8.contiguous(), factor=factor, sigma_mult=sigmas,
                                     sigma_add=sigma_add, distribution=distribution, seed=seed,
                                     offset=offset, out_dtype=out_dtype, clip=clip)
    if chosen == "reference":
        from .reference import noisy_batch_reference
        return noisy_batch_reference(
            clean_u8, factor=factor, sigma_mult=sigmas, sigma_add=sigma_add,
            distribution=distribution, out_dtype=out_dtype, clip=clip,
            generator=_reference_generator(clean_u8.device, seed, offset))
    src = clean_u8.contiguous()
    noisy = torch.empty(src.shape, dtype=out_dtype, device=src.device)
    clean = torch.empty_like(noisy)
    _launch(src, noisy, clean, factor=factor, sigmas=sigmas, sigma_add=sigma_add,
            distribution=distribution, clip=clip, seed=seed, offset=offset, block=_block)
    return noisy, clean


# ------------------------------------------------- the same stream in plain torch (the spec)

def _mul_hi_lo(a: int, b: torch.Tensor):
    """(a * b) >> 32 and (a * b) & 0xFFFFFFFF for a 32-bit constant a and uint32 values b held
    in int64, without overflowing int64 (split a into 16-bit halves)."""
    s = (a >> 16) * b
    t = (a & 0xFFFF) * b
    hi = (s + (t >> 16)) >> 16
    lo = (((s & 0xFFFF) << 16) + t) & _U32
    return hi, lo


def philox4x32_10(seed: int, c0, c1, c2, c3):
    """Philox4x32-10 on int64 tensors holding uint32 counters; key = (seed lo, seed hi).
    Returns the four output words (int64 tensors with values in [0, 2**32))."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _U32
        k1 = (k1 + 0xBB67AE85) & _U32
    return c0, c1, c2, c3


def _uniform_torch(r: torch.Tensor) -> torch.Tensor:
    v = torch.where(r >= 2 ** 31, _U32 - r, r)
    return v.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _radius_torch(u: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(-2.0 * torch.log(torch.clamp(u, min=_TINY_UNIFORM)))


def noise_fields(numel: int, *, seed: int = 0, offset: int = 0, distribution: str = "gaussian",
                 device="cpu"):
    """(n1, n2), float32 of length numel: the kernel's noise for flat indices 0..numel-1,
    computed from the counter layout in the module header with torch integer ops. Equal to the
    kernel's up to the last ulp of log/cos; meant for tests and as the oracle of a port."""
    _check_distribution(distribution)
    seed, offset = _check_counter("seed", seed), _check_counter("offset", offset)
    e = offset + torch.arange(numel, dtype=torch.int64, device=device)
    zero = torch.zeros_like(e)
    r0, r1, r2, r3 = philox4x32_10(seed, e & _U32, e >> 32, zero, zero)
    rho0 = _radius_torch(_uniform_torch(r0))
    if distribution == "rayleigh":
        n1 = (rho0 - _RAYLEIGH_MEAN) * (1.0 / _RAYLEIGH_STD)
    else:
        n1 = rho0 * torch.cos(2 * math.pi * _uniform_torch(r1))
    n2 = _radius_torch(_uniform_torch(r2)) * torch.cos(2 * math.pi * _uniform_torch(r3))
    return n1, n2


def image_uniforms(images: int, numel_per_image: int, *, seed: int = 0, offset: int = 0,
                   device="cpu") -> torch.Tensor:
    """The per-image uniforms u_i (float32) that pick sigma_i = low + (high - low) * u_i."""
    seed, offset = _check_counter("seed", seed), _check_counter("offset", offset)
    e = offset + torch.arange(images, dtype=torch.int64, device=device) * numel_per_image
    zero = torch.zeros_like(e)
    r0, _, _, _ = philox4x32_10(seed, e & _U32, e >> 32, zero, zero + 1)
    return _uniform_torch(r0)
