"""Speckle noise: the Triton kernel (under the interpreter on CPU), its counter layout, the
plain-torch reference, the fused batch maker and argument checks.

Statistical tolerances (used below as TOL_*): with N = 2**20 independent draws, a sample mean
of a variable with variance V has standard error sqrt(V / N). We accept 5 standard errors, a
two-sided false-alarm rate of 6e-7 per check, so the suite is not flaky, while a wrong
constant (e.g. a Rayleigh not standardized, variance 0.43 instead of 1) misses by hundreds of
standard errors.
  mean of n              V = 1                         -> 5 / 1024 = 4.9e-3
  variance (mean of n^2) V = E[n^4] - 1 = 2 (gaussian), 2.245 (rayleigh) -> 5 * sqrt(V / N)
  skewness (mean of n^3, exact mean 0 and variance 1 known) V = E[n^6] - E[n^3]^2
                         gaussian: 15 -> 1.9e-2; rayleigh: from the Rayleigh moments below
  mean of n1 * n2        V = E[n1^2] E[n2^2] = 1 for independent variables -> 4.9e-3
  P(n <= q)              V = p (1 - p)
The variance check uses the mean of n^2 (the exact mean 0 is known), not E[x^2] - E[x]^2.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from speckle_kernels import _ext, noise as N
from speckle_kernels import reference as R
from speckle_kernels._backend import HAS_TRITON, triton_interpreting
from speckle_kernels.reference import noisy_batch_reference, speckle_noise_reference

needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_interpreting()),
                                  reason="needs Triton with TRITON_INTERPRET=1 on CPU")

DRAWS = 1 << 20
SE_UNIT = 1.0 / math.sqrt(DRAWS)
RAYLEIGH_SKEW = 2 * math.sqrt(math.pi) * (math.pi - 3) / (4 - math.pi) ** 1.5  # 0.6311


def rayleigh_standard_moment(k: int) -> float:
    """E[n^k] for n = (R - sqrt(pi/2)) / sqrt(2 - pi/2), from E[R^j] = 2^(j/2) Gamma(1 + j/2)."""
    m, s = math.sqrt(math.pi / 2), math.sqrt(2 - math.pi / 2)
    raw = [2 ** (j / 2) * math.gamma(1 + j / 2) for j in range(k + 1)]
    return sum(math.comb(k, j) * raw[j] * (-m) ** (k - j) for j in range(k + 1)) / s ** k


def moment_tolerances(distribution):
    if distribution == "gaussian":
        m3, m4, m6 = 0.0, 3.0, 15.0
    else:
        m3, m4, m6 = (rayleigh_standard_moment(k) for k in (3, 4, 6))
    return m3, 5 * SE_UNIT, 5 * math.sqrt(m4 - 1) * SE_UNIT, 5 * math.sqrt(m6 - m3 ** 2) * SE_UNIT


def kernel_fields(distribution, seed=11, offset=0, numel=DRAWS):
    """n1 and n2 recovered from the kernel: x = 1, no clip, one of the two terms switched off.
    The fields do not depend on the noise parameters, so both calls see the same n1 and n2."""
    x = torch.ones(numel)
    kw = dict(distribution=distribution, clip=False, seed=seed, offset=offset, backend="triton",
              _block=numel)
    y1 = N.add_speckle_noise(x, factor=1.0, sigma_mult=1.0, sigma_add=0.0, **kw)
    y2 = N.add_speckle_noise(x, factor=0.0, sigma_mult=1.0, sigma_add=1.0, **kw)
    return (y1 - 1).double(), (y2 - 1).double()


def check_moments(n, distribution):
    skew, tol_mean, tol_var, tol_skew = moment_tolerances(distribution)
    assert abs(n.mean().item()) < tol_mean
    assert abs((n * n).mean().item() - 1.0) < tol_var
    assert abs((n ** 3).mean().item() - skew) < tol_skew


def test_rayleigh_constants():
    assert rayleigh_standard_moment(1) == pytest.approx(0.0, abs=1e-12)
    assert rayleigh_standard_moment(2) == pytest.approx(1.0, rel=1e-12)
    assert rayleigh_standard_moment(3) == pytest.approx(RAYLEIGH_SKEW, rel=1e-12)
    assert RAYLEIGH_SKEW == pytest.approx(0.631, abs=1e-3)


# ------------------------------------------------------------------ statistics of the kernel

@needs_triton
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
def test_kernel_moments(distribution):
    n1, n2 = kernel_fields(distribution)
    check_moments(n1, distribution)
    check_moments(n2, "gaussian")
    # n1, n2 uncorrelated, and neighbouring counters uncorrelated
    assert abs((n1 * n2).mean().item()) < 5 * SE_UNIT
    assert abs((n1[1:] * n1[:-1]).mean().item()) < 5 * SE_UNIT
    assert abs((n2[1:] * n2[:-1]).mean().item()) < 5 * SE_UNIT
    # one point of the distribution function besides the moments
    q, p = (1.0, 0.5 * (1 + math.erf(1 / math.sqrt(2)))) if distribution == "gaussian" else \
        (0.0, 1 - math.exp(-math.pi / 4))        # n1 <= 0  <=>  R <= sqrt(pi/2)
    assert abs((n1 <= q).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p)) * SE_UNIT
    if distribution == "rayleigh":
        assert n1.min().item() >= -1.2533141373155001 / 0.6551363775620336 - 1e-5


@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
def test_reference_moments(distribution):
    gen = torch.Generator().manual_seed(3)
    x = torch.ones(DRAWS)
    y1 = speckle_noise_reference(x, factor=1.0, sigma_mult=1.0, sigma_add=0.0,
                                 distribution=distribution, clip=False, generator=gen)
    y2 = speckle_noise_reference(x, factor=0.0, sigma_mult=1.0, sigma_add=1.0,
                                 distribution=distribution, clip=False, generator=gen)
    check_moments((y1 - 1).double(), distribution)
    check_moments((y2 - 1).double(), "gaussian")


def test_port_per_image_uniforms():
    u = R.image_uniforms(1 << 16, 16384, seed=5, offset=3).double()
    se = math.sqrt(1 / 12 / u.numel())
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * se
    assert abs((u - 0.5).pow(2).mean().item() - 1 / 12) < 5 * math.sqrt(1 / 180) * (1 / math.sqrt(u.numel()))
    assert abs(((u[1:] - 0.5) * (u[:-1] - 0.5)).mean().item()) < 5 * (1 / 12) / math.sqrt(u.numel())


@needs_triton
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
def test_kernel_matches_reference_distribution(distribution):
    """Kernel and reference produce the same distribution of noisy values on a realistic
    setting (clipping active): two-sample Kolmogorov-Smirnov distance below the alpha = 1e-6
    critical value c(alpha) sqrt(2 / n), c = sqrt(-ln(alpha / 2) / 2) = 2.69."""
    n = 1 << 18
    x = torch.linspace(0.05, 0.95, n)
    kw = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.05, distribution=distribution, clip=True)
    yk = N.add_speckle_noise(x, seed=4, backend="triton", _block=n, **kw)
    yr = speckle_noise_reference(x, generator=torch.Generator().manual_seed(4), **kw)
    grid = torch.linspace(0, 1, 2001)
    cdf_k = torch.searchsorted(yk.sort().values, grid, right=True).double() / n
    cdf_r = torch.searchsorted(yr.sort().values, grid, right=True).double() / n
    crit = math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n)
    assert (cdf_k - cdf_r).abs().max().item() < crit
    # and a mismatched setting is detected by the same statistic (the check can fail)
    yw = speckle_noise_reference(x, generator=torch.Generator().manual_seed(4),
                                 **{**kw, "factor": 6.0})
    cdf_w = torch.searchsorted(yw.sort().values, grid, right=True).double() / n
    assert (cdf_k - cdf_w).abs().max().item() > crit


# ------------------------------------------------------------- counter layout and bit-exactness

def expected_noise(x, *, factor, sigma_mult, sigma_add, distribution, clip, seed, offset):
    """The kernel's formula in torch, with the noise of the documented counter layout."""
    images = x.shape[0] if x.dim() >= 2 else 1
    per = x.numel() // images
    n1, n2 = R.noise_fields(x.numel(), seed=seed, offset=offset, distribution=distribution)
    if isinstance(sigma_mult, tuple):
        u = R.image_uniforms(images, per, seed=seed, offset=offset)
        sigma = sigma_mult[0] + (sigma_mult[1] - sigma_mult[0]) * u
    else:
        sigma = torch.full((images,), float(sigma_mult))
    fs = (factor * sigma).repeat_interleave(per)
    y = x.float().reshape(-1) * (1 + fs * n1) + sigma_add * n2
    if clip:
        y = y.clamp(0, 1)
    return y.view(x.shape)


@needs_triton
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("shape,sigma_mult", [((3, 1, 7, 13), (0.1, 0.75)), ((5, 31), 0.3),
                                              ((257,), (0.2, 0.6)), ((2, 3, 4, 5), 0.5)])
def test_kernel_follows_documented_counter_layout(distribution, shape, sigma_mult):
    torch.manual_seed(0)
    x = torch.rand(shape)
    kw = dict(factor=2.0, sigma_mult=sigma_mult, sigma_add=0.07, distribution=distribution,
              clip=False, seed=2 ** 40 + 17, offset=2 ** 33 + 5)
    y = N.add_speckle_noise(x, backend="triton", **kw)
    torch.testing.assert_close(y, expected_noise(x, **kw), rtol=0, atol=2e-6)


@pytest.mark.parametrize("key,ctr,expected", [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_port_known_answers(key, ctr, expected):
    """Random123's Philox4x32-10 known-answer vectors: the torch port (and so the kernel, which
    matches the port bit for bit above) is the standard generator a C++ port can be checked on."""
    seed = key[0] | (key[1] << 32)
    out = R.philox4x32_10(seed, *[torch.tensor([c], dtype=torch.int64) for c in ctr])
    assert tuple(o.item() for o in out) == expected


@needs_triton
def test_same_seed_same_bits_any_launch_configuration():
    torch.manual_seed(1)
    x = torch.rand(4, 1, 19, 23)
    kw = dict(factor=5.0, sigma_mult=(0.1, 0.75), distribution="rayleigh", seed=9, offset=100,
              backend="triton")
    a = N.add_speckle_noise(x, **kw)
    assert torch.equal(a, N.add_speckle_noise(x, **kw))
    for block in (16, 128, 1024):
        assert torch.equal(a, N.add_speckle_noise(x, _block=block, **kw))
    # batch split: images [0:k] and [k:N] with the offset moved by k images
    per = x[0].numel()
    k = 3
    lo = N.add_speckle_noise(x[:k], **kw)
    hi = N.add_speckle_noise(x[k:], **{**kw, "offset": kw["offset"] + k * per})
    assert torch.equal(torch.cat([lo, hi]), a)
    # non-contiguous input: same values as its contiguous copy
    xt = x.transpose(2, 3)
    assert torch.equal(N.add_speckle_noise(xt, **kw), N.add_speckle_noise(xt.contiguous(), **kw))


@needs_triton
@pytest.mark.parametrize("change", [{"seed": 10}, {"offset": 101}, {"offset": 100 + 2 ** 32}])
def test_different_seed_or_offset_differs(change):
    torch.manual_seed(2)
    x = torch.rand(2, 1, 8, 8) * 0.8 + 0.1
    kw = dict(factor=1.0, sigma_mult=(0.1, 0.75), clip=False, seed=9, offset=100, backend="triton")
    a = N.add_speckle_noise(x, **kw)
    b = N.add_speckle_noise(x, **{**kw, **change})
    assert (a != b).float().mean().item() > 0.99


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    torch.manual_seed(3)
    x = torch.rand(3, 1, 9, 11).to(dtype)
    kw = dict(factor=1.0, sigma_mult=0.3, sigma_add=0.02, distribution="gaussian", clip=True,
              seed=1, offset=0)
    y = N.add_speckle_noise(x, backend="triton", **kw)
    assert y.dtype == dtype and y.shape == x.shape
    expected = expected_noise(x, **kw).to(dtype)
    # kernel and torch round the same fp32 value; allow one ulp for last-bit fp32 differences
    torch.testing.assert_close(y.float(), expected.float(), rtol=2 ** -7, atol=1e-3)


@needs_triton
def test_clip_behaviour():
    torch.manual_seed(4)
    x = torch.rand(2, 1, 16, 16)
    kw = dict(factor=10.0, sigma_mult=0.1, sigma_add=0.02, seed=5, backend="triton")
    raw = N.add_speckle_noise(x, clip=False, **kw)
    clipped = N.add_speckle_noise(x, clip=True, **kw)
    assert raw.min().item() < 0 and raw.max().item() > 1      # factor 10 leaves [0, 1] often
    assert torch.equal(clipped, raw.clamp(0, 1))
    assert (clipped == 0).any() and (clipped == 1).any()


@needs_triton
def test_empty_and_zero_dim():
    assert N.add_speckle_noise(torch.empty(0, 1, 4, 4), backend="triton").shape == (0, 1, 4, 4)
    y = N.add_speckle_noise(torch.tensor(0.5), sigma_mult=(0.1, 0.2), clip=False, seed=3,
                            backend="triton")
    expected = expected_noise(torch.tensor(0.5), factor=1.0, sigma_mult=(0.1, 0.2),
                              sigma_add=N.DEFAULT_SIGMA_ADD, distribution="gaussian",
                              clip=False, seed=3, offset=0)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------- fused batch maker

def u8_images(n=4, h=12, w=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, h, w), generator=g, dtype=torch.uint8)


@needs_triton
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_make_noisy_batch_matches_direct_computation(distribution, out_dtype):
    u8 = u8_images()
    kw = dict(factor=5.0, sigma_mult=(0.1, 0.75), sigma_add=0.03, distribution=distribution,
              seed=21, offset=12345)
    noisy, clean = N.make_noisy_batch(u8, out_dtype=out_dtype, backend="triton", **kw)
    assert noisy.dtype == clean.dtype == out_dtype and noisy.shape == clean.shape == u8.shape
    v = u8.float() / 255
    expected = (expected_noise(v, clip=True, **kw) - 0.5) / 0.5
    if out_dtype == torch.float32:
        torch.testing.assert_close(clean, (v - 0.5) / 0.5, rtol=0, atol=0)
        torch.testing.assert_close(noisy, expected, rtol=0, atol=4e-6)
    else:
        # Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: allow
        # one bf16 ulp (relative 2^-7 at most) against the fp32 values, and no more.
        torch.testing.assert_close(clean.float(), (v - 0.5) / 0.5, rtol=2 ** -7, atol=1e-7)
        torch.testing.assert_close(noisy.float(), expected, rtol=2 ** -7, atol=1e-5)
    # and the same noise as add_speckle_noise on v with the same counters
    y = N.add_speckle_noise(v, clip=True, backend="triton", **kw)
    if out_dtype == torch.float32:
        torch.testing.assert_close(noisy, 2 * y - 1, rtol=0, atol=4e-6)


@needs_triton
def test_make_noisy_batch_split_and_clip():
    u8 = u8_images(n=5, h=8, w=8, seed=1)
    kw = dict(factor=10.0, sigma_mult=0.1, seed=3, offset=64, backend="triton")
    noisy, _ = N.make_noisy_batch(u8, **kw)
    assert noisy.min().item() == -1.0 and noisy.max().item() == 1.0
    head, _ = N.make_noisy_batch(u8[:2], **kw)
    tail, _ = N.make_noisy_batch(u8[2:], **{**kw, "offset": 64 + 2 * 64})
    assert torch.equal(torch.cat([head, tail]), noisy)
    raw, _ = N.make_noisy_batch(u8, clip=False, **kw)
    assert raw.min().item() < -1.0 and raw.max().item() > 1.0


def test_reference_backend_and_batch_reference():
    u8 = u8_images(n=3, seed=2)
    kw = dict(factor=1.0, sigma_mult=(0.1, 0.75), sigma_add=0.02, distribution="rayleigh")
    a, ca = N.make_noisy_batch(u8, seed=1, offset=0, backend="reference", **kw)
    b, _ = N.make_noisy_batch(u8, seed=1, offset=0, backend="reference", **kw)
    c, _ = N.make_noisy_batch(u8, seed=1, offset=1, backend="reference", **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min().item() >= -1 and a.max().item() <= 1
    torch.testing.assert_close(ca, u8.float() / 127.5 - 1, rtol=0, atol=1e-6)
    r, cr = noisy_batch_reference(u8, out_dtype=torch.bfloat16,
                                  generator=torch.Generator().manual_seed(0), **kw)
    assert r.dtype == cr.dtype == torch.bfloat16
    # auto on CPU tensors is the C++ kernel when built (the same counter-based stream as
    # Triton's), else the reference
    x = u8.float() / 255
    auto = N.add_speckle_noise(x, seed=4, **kw)
    expected_backend = "cpu" if _ext.HAS_CPU_EXT else "reference"
    ref = N.add_speckle_noise(x, seed=4, backend=expected_backend, **kw)
    assert torch.equal(auto, ref) and not torch.equal(auto, x)
    assert N.add_speckle_noise(x.double(), seed=4, backend="reference", **kw).dtype == torch.float64


# ------------------------------------------------------------------------ bad arguments

X = torch.rand(2, 1, 4, 4)
U8 = (X * 255).to(torch.uint8)


@pytest.mark.parametrize("kwargs,exc,text", [
    ({"sigma_mult": -0.1}, ValueError, "sigma_mult"),
    ({"sigma_add": -1.0}, ValueError, "sigma_add"),
    ({"factor": -2.0}, ValueError, "factor"),
    ({"factor": float("nan")}, TypeError, "factor"),
    ({"factor": True}, TypeError, "factor"),
    ({"distribution": "poisson"}, ValueError, "poisson"),
    ({"sigma_mult": (0.75, 0.1)}, ValueError, "low <= high"),
    ({"sigma_mult": (0.1, 0.2, 0.3)}, ValueError, "sigma_mult"),
    ({"sigma_mult": (-0.1, 0.2)}, ValueError, "sigma_mult low"),
    ({"sigma_mult": "0.1"}, TypeError, "sigma_mult"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"offset": 2 ** 63}, ValueError, "offset"),
    ({"backend": "gpu"}, ValueError, "gpu"),
])
def test_bad_arguments(kwargs, exc, text):
    with pytest.raises(exc, match=text.replace("(", r"\(")):
        N.add_speckle_noise(X, **kwargs)
    with pytest.raises(exc, match=text.replace("(", r"\(")):
        N.make_noisy_batch(U8, **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        N.add_speckle_noise(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        N.add_speckle_noise([0.5, 0.5])
    with pytest.raises(TypeError, match="uint8.*float32"):
        N.make_noisy_batch(X)
    with pytest.raises(ValueError, match=r"4-d.*\(1, 4, 4\)"):
        N.make_noisy_batch(U8[0])
    with pytest.raises(TypeError, match="out_dtype"):
        N.make_noisy_batch(U8, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        N.add_speckle_noise(X, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        N.add_speckle_noise(X, backend="gpu")


@needs_triton
def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        N.add_speckle_noise(X.double(), backend="triton")


def test_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from speckle_kernels import noise\n"
            "from speckle_kernels._backend import HAS_TRITON\n"
            "assert not HAS_TRITON\n"
            "y = noise.add_speckle_noise(torch.full((2, 8), 0.5), seed=1)\n"
            "assert y.shape == (2, 8) and not torch.equal(y, torch.full((2, 8), 0.5))\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
