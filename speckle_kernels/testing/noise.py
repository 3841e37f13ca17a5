"""The speckle-noise case kit: the stream every kernel must reproduce, the cases it is checked on,
and the tolerances, derived once here for every backend, the benchmarks and the GPU check.

Stream equality. The kernels (Triton, C++ CPU, CUDA) must give, for each (seed, offset), the
values of the documented counter layout (speckle_kernels/noise_stream.py), computed here from
the plain-torch Philox port (reference.noise_fields / image_uniforms). The integer words are
exact; the float part (log, cos, sqrt, products) may differ by a few ulp between libdevice,
NumPy (the interpreter), the CPU kernel's polynomials and torch. A standard normal
n = sqrt(-2 ln u) cos(2 pi u') is then off by at most N_TOL = 4e-6: about 10 ulp relative of its
largest value sqrt(-2 ln 1e-7) = 5.68 (tests/test_noise_cpu.py measures the CPU kernel's
normals against float64 to a tighter bound). So

    |y - y_stream| <= N_TOL * (max|x| * factor * sigma_high + sigma_add) + ulp(1, output dtype)

the last term for the one rounding to a half-precision output (and fp32's own rounding).

Moments. With DRAWS = 2**20 independent draws a sample mean of a variable with variance V has
standard error sqrt(V / DRAWS); 5 standard errors (a two-sided false alarm of 6e-7 a check)
keeps the suite from flaking, while a wrong constant (a Rayleigh not standardized: variance
0.43, not 1) misses by hundreds.
    mean of n          V = 1
    mean of n^2        V = E[n^4] - 1 (3 - 1 gaussian; 2.245 rayleigh)
    mean of n^3        V = E[n^6] - E[n^3]^2 (15 gaussian; from the Rayleigh moments below)
    mean of n1 * n2    V = 1 for independent unit variables (and for neighbours in the stream)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from speckle_kernels.reference import image_uniforms, noise_fields

N_TOL = 4e-6
DRAWS = 1 << 20
SE_UNIT = 1.0 / math.sqrt(DRAWS)
RAYLEIGH_SKEW = 2 * math.sqrt(math.pi) * (math.pi - 3) / (4 - math.pi) ** 1.5  # 0.6311
_ULP_OF_ONE = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def expected_noise(x, *, factor=1.0, sigma_mult=0.1, sigma_add=0.02, distribution="gaussian",
                   clip=True, seed=0, offset=0) -> torch.Tensor:
    """y of the documented stream for intensities x, in fp32 (x's shape)."""
    images = x.shape[0] if x.dim() >= 2 else 1
    per = x.numel() // images if images else 0
    n1, n2 = noise_fields(x.numel(), seed=seed, offset=offset, distribution=distribution, device=x.device)
    if isinstance(sigma_mult, (tuple, list)):
        u = image_uniforms(images, per, seed=seed, offset=offset, device=x.device)
        sigma = sigma_mult[0] + (sigma_mult[1] - sigma_mult[0]) * u
    else:
        sigma = torch.full((images,), float(sigma_mult), device=x.device)
    fs = (factor * sigma).repeat_interleave(per)
    y = x.float().reshape(-1) * (1 + fs * n1) + sigma_add * n2
    return (y.clamp(0, 1) if clip else y).view(x.shape)


def stream_tolerance(x: torch.Tensor, *, factor=1.0, sigma_mult=0.1, sigma_add=0.02,
                     out_dtype: torch.dtype = torch.float32, **_) -> float:
    high = max(sigma_mult) if isinstance(sigma_mult, (tuple, list)) else float(sigma_mult)
    scale = x.float().abs().max().item() if x.numel() else 0.0
    return N_TOL * (scale * factor * high + sigma_add) + _ULP_OF_ONE[out_dtype]


@dataclass(frozen=True)
class StreamCase:
    shape: tuple[int, ...]
    sigma_mult: float | tuple[float, float]
    distribution: str
    seed: int
    offset: int
    dtype: torch.dtype = torch.float32
    clip: bool = False
    factor: float = 2.0
    sigma_add: float = 0.07

    @property
    def id(self) -> str:
        dims = "x".join(map(str, self.shape)) or "scalar"
        sig = "per-image" if isinstance(self.sigma_mult, tuple) else "fixed"
        return f"{dims}-{self.distribution}-{sig}-{str(self.dtype)[6:]}-s{self.seed}-o{self.offset}"

    def kwargs(self) -> dict:
        return dict(factor=self.factor, sigma_mult=self.sigma_mult, sigma_add=self.sigma_add,
                    distribution=self.distribution, clip=self.clip, seed=self.seed, offset=self.offset)


STREAM_CASES = [
    StreamCase((3, 1, 7, 13), (0.1, 0.75), "gaussian", 2**40 + 17, 2**33 + 5),
    StreamCase((3, 1, 7, 13), (0.1, 0.75), "rayleigh", 2**40 + 17, 2**33 + 5),
    StreamCase((5, 31), 0.3, "gaussian", 0, 0, clip=True),
    StreamCase((257,), (0.2, 0.6), "rayleigh", 1234567890123, 99),
    StreamCase((2, 3, 4, 5), 0.5, "gaussian", 7, 2**32 - 5),          # crosses the counter's hi word
    StreamCase((), (0.1, 0.2), "gaussian", 3, 0),                     # a 0-d tensor is one image
    StreamCase((3, 2, 17, 9), 0.1, "gaussian", 5, 11, dtype=torch.float16, clip=True, factor=1.0),
    StreamCase((3, 2, 17, 9), (0.1, 0.75), "rayleigh", 5, 11, dtype=torch.bfloat16, clip=True),
]


def stream_input(case: StreamCase, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(len(case.id))
    return torch.rand(case.shape, generator=g, device=device).to(case.dtype)


def u8_images(n=4, h=12, w=17, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (n, 1, h, w), generator=g, dtype=torch.uint8, device=device)


def rayleigh_standard_moment(k: int) -> float:
    """E[n^k] for n = (R - sqrt(pi/2)) / sqrt(2 - pi/2), from E[R^j] = 2^(j/2) Gamma(1 + j/2)."""
    m, s = math.sqrt(math.pi / 2), math.sqrt(2 - math.pi / 2)
    raw = [2 ** (j / 2) * math.gamma(1 + j / 2) for j in range(k + 1)]
    return sum(math.comb(k, j) * raw[j] * (-m) ** (k - j) for j in range(k + 1)) / s ** k


def moment_tolerances(distribution: str) -> tuple[float, float, float, float]:
    """(third moment, tolerance of the mean, of the mean of n^2, of the mean of n^3)."""
    if distribution == "gaussian":
        m3, m4, m6 = 0.0, 3.0, 15.0
    else:
        m3, m4, m6 = (rayleigh_standard_moment(k) for k in (3, 4, 6))
    return m3, 5 * SE_UNIT, 5 * math.sqrt(m4 - 1) * SE_UNIT, 5 * math.sqrt(m6 - m3 ** 2) * SE_UNIT


def moment_failures(n: torch.Tensor, distribution: str) -> list[str]:
    """What is wrong with the first three moments of a unit noise field n (empty: nothing)."""
    skew, tol_mean, tol_var, tol_skew = moment_tolerances(distribution)
    n = n.double()
    out = []
    if abs(n.mean().item()) >= tol_mean:
        out.append(f"mean {n.mean().item():.3g} (tolerance {tol_mean:.3g})")
    if abs((n * n).mean().item() - 1.0) >= tol_var:
        out.append(f"E[n^2] {(n * n).mean().item():.5g} (tolerance {tol_var:.3g} around 1)")
    if abs((n ** 3).mean().item() - skew) >= tol_skew:
        out.append(f"E[n^3] {(n ** 3).mean().item():.4g} (tolerance {tol_skew:.3g} around {skew:.4g})")
    return out
