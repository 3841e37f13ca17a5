"""Speckle noise on every backend (reference, cpu, triton, cuda), judged by one kit.

speckle_kernels/testing/noise.py holds the stream the kernels must reproduce (the plain-torch Philox port),
the cases, and the derived tolerances: stream equality for every kernel backend, the noise
fields' moments for all four (the reference draws from torch's generator: same distribution,
other numbers), then the fused batch maker, reproducibility and the argument checks.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from speckle_kernels import _ext, noise as N
from speckle_kernels import reference as R
from speckle_kernels.noise_stream import RAYLEIGH_MEAN, RAYLEIGH_STD
from speckle_kernels.reference import noisy_batch_reference

from speckle_kernels.testing import noise as kit
from speckle_kernels.testing.backends import BACKENDS, require

KERNELS = tuple(b for b in BACKENDS if b != "reference")


def _block(backend, numel):
    # Triton's interpreter pays per program: one program for the whole tensor there
    return {"_block": max(16, 1 << (max(numel, 1) - 1).bit_length())} if backend == "triton" else {}


@pytest.mark.parametrize("case", kit.STREAM_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", KERNELS)
def test_stream_equality(backend, case):
    device = require(backend)
    x = kit.stream_input(case, device)
    y = N.add_speckle_noise(x, backend=backend, **case.kwargs())
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = kit.expected_noise(x, **case.kwargs())
    tol = kit.stream_tolerance(x, out_dtype=case.dtype, **case.kwargs())
    worst = (y.float() - expected).abs().max().item() if y.numel() else 0.0
    assert worst <= tol, f"max |y - stream| {worst:.3g} > {tol:.3g}"


def test_rayleigh_constants():
    assert kit.rayleigh_standard_moment(1) == pytest.approx(0.0, abs=1e-12)
    assert kit.rayleigh_standard_moment(2) == pytest.approx(1.0, rel=1e-12)
    assert kit.rayleigh_standard_moment(3) == pytest.approx(kit.RAYLEIGH_SKEW, rel=1e-12)
    assert kit.RAYLEIGH_SKEW == pytest.approx(0.631, abs=1e-3)


def noise_fields_of(backend, distribution, device, seed=11, numel=kit.DRAWS):
    """n1 and n2 recovered from a backend: x = 1, no clip, one of the two terms switched off.
    The fields do not depend on the noise parameters, so both calls see the same n1 and n2."""
    x = torch.ones(numel, device=device)
    kw = dict(distribution=distribution, clip=False, seed=seed, offset=0, backend=backend,
              **_block(backend, numel))
    y1 = N.add_speckle_noise(x, factor=1.0, sigma_mult=1.0, sigma_add=0.0, **kw)
    y2 = N.add_speckle_noise(x, factor=0.0, sigma_mult=1.0, sigma_add=1.0, **kw)
    return (y1 - 1).double(), (y2 - 1).double()


@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_field_moments(backend, distribution):
    device = require(backend)
    n1, n2 = noise_fields_of(backend, distribution, device)
    assert not kit.moment_failures(n1, distribution), kit.moment_failures(n1, distribution)
    assert not kit.moment_failures(n2, "gaussian"), kit.moment_failures(n2, "gaussian")
    se = kit.SE_UNIT
    # n1, n2 uncorrelated, and neighbouring counters uncorrelated
    assert abs((n1 * n2).mean().item()) < 5 * se
    assert abs((n1[1:] * n1[:-1]).mean().item()) < 5 * se
    assert abs((n2[1:] * n2[:-1]).mean().item()) < 5 * se
    # one point of the distribution function besides the moments
    q, p = (1.0, 0.5 * (1 + math.erf(1 / math.sqrt(2)))) if distribution == "gaussian" else \
        (0.0, 1 - math.exp(-math.pi / 4))        # n1 <= 0  <=>  R <= sqrt(pi/2)
    assert abs((n1 <= q).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p)) * se
    if distribution == "rayleigh":
        assert n1.min().item() >= -RAYLEIGH_MEAN / RAYLEIGH_STD - 1e-5


def test_port_per_image_uniforms():
    u = R.image_uniforms(1 << 16, 16384, seed=5, offset=3).double()
    se = math.sqrt(1 / 12 / u.numel())
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 5 * se
    assert abs((u - 0.5).pow(2).mean().item() - 1 / 12) < 5 * math.sqrt(1 / 180) * (1 / math.sqrt(u.numel()))
    assert abs(((u[1:] - 0.5) * (u[:-1] - 0.5)).mean().item()) < 5 * (1 / 12) / math.sqrt(u.numel())


@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_matches_reference_distribution(backend, distribution):
    """Kernel and reference produce the same distribution of noisy values on a realistic
    setting (clipping active): two-sample Kolmogorov-Smirnov distance below the alpha = 1e-6
    critical value c(alpha) sqrt(2 / n), c = sqrt(-ln(alpha / 2) / 2) = 2.69."""
    device = require(backend)
    n = 1 << 18
    x = torch.linspace(0.05, 0.95, n, device=device)
    kw = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.05, distribution=distribution, clip=True)
    yk = N.add_speckle_noise(x, seed=4, backend=backend, **_block(backend, n), **kw).cpu()
    yr = N.add_speckle_noise(x, seed=4, backend="reference", **kw).cpu()
    grid = torch.linspace(0, 1, 2001)
    cdf_k = torch.searchsorted(yk.sort().values, grid, right=True).double() / n
    cdf_r = torch.searchsorted(yr.sort().values, grid, right=True).double() / n
    crit = math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n)
    assert (cdf_k - cdf_r).abs().max().item() < crit
    # and a mismatched setting is detected by the same statistic (the check can fail)
    yw = N.add_speckle_noise(x, seed=4, backend="reference", **{**kw, "factor": 6.0}).cpu()
    cdf_w = torch.searchsorted(yw.sort().values, grid, right=True).double() / n
    assert (cdf_k - cdf_w).abs().max().item() > crit


@pytest.mark.parametrize("key,ctr,expected", [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_port_known_answers(key, ctr, expected):
    """Random123's Philox4x32-10 known-answer vectors: the torch port (the oracle every kernel
    matches in test_stream_equality) is the standard generator."""
    seed = key[0] | (key[1] << 32)
    out = R.philox4x32_10(seed, *[torch.tensor([c], dtype=torch.int64) for c in ctr])
    assert tuple(o.item() for o in out) == expected


@pytest.mark.parametrize("backend", KERNELS)
def test_same_seed_same_bits_any_launch_configuration(backend):
    device = require(backend)
    x = torch.rand(4, 1, 19, 23, device=device)
    kw = dict(factor=5.0, sigma_mult=(0.1, 0.75), distribution="rayleigh", seed=9, offset=100,
              backend=backend)
    a = N.add_speckle_noise(x, **kw)
    assert torch.equal(a, N.add_speckle_noise(x, **kw))
    if backend == "triton":
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


@pytest.mark.parametrize("change", [{"seed": 10}, {"offset": 101}, {"offset": 100 + 2 ** 32}])
@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seed_or_offset_differs(backend, change):
    device = require(backend)
    x = torch.rand(2, 1, 8, 8, device=device) * 0.8 + 0.1
    kw = dict(factor=1.0, sigma_mult=(0.1, 0.75), clip=False, seed=9, offset=100, backend=backend)
    a = N.add_speckle_noise(x, **kw)
    b = N.add_speckle_noise(x, **{**kw, **change})
    assert (a != b).float().mean().item() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_behaviour(backend):
    device = require(backend)
    x = torch.rand(2, 1, 16, 16, device=device)
    kw = dict(factor=10.0, sigma_mult=0.1, sigma_add=0.02, seed=5, backend=backend)
    raw = N.add_speckle_noise(x, clip=False, **kw)
    clipped = N.add_speckle_noise(x, clip=True, **kw)
    assert raw.min().item() < 0 and raw.max().item() > 1      # factor 10 leaves [0, 1] often
    assert torch.equal(clipped, raw.clamp(0, 1))
    assert (clipped == 0).any() and (clipped == 1).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    device = require(backend)
    assert N.add_speckle_noise(torch.empty(0, 1, 4, 4, device=device), backend=backend).shape == (0, 1, 4, 4)


# ------------------------------------------------------------------- fused batch maker

@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", KERNELS)
def test_make_noisy_batch_follows_the_stream(backend, out_dtype, distribution):
    device = require(backend)
    u8 = kit.u8_images(device=device)
    kw = dict(factor=5.0, sigma_mult=(0.1, 0.75), sigma_add=0.03, distribution=distribution,
              seed=21, offset=12345)
    noisy, clean = N.make_noisy_batch(u8, out_dtype=out_dtype, backend=backend, **kw)
    assert noisy.dtype == clean.dtype == out_dtype and noisy.shape == clean.shape == u8.shape
    v = u8.float() / 255
    # noisy = 2y - 1 and clean = 2v - 1: the doubling doubles the stream's tolerance
    tol = 2 * kit.stream_tolerance(v, out_dtype=out_dtype, **kw)
    assert (clean.float() - (2 * v - 1)).abs().max().item() <= 2 * kit.stream_tolerance(
        v, factor=0.0, sigma_add=0.0, out_dtype=out_dtype)
    expected = 2 * kit.expected_noise(v, clip=True, **kw) - 1
    worst = (noisy.float() - expected).abs().max().item()
    assert worst <= tol, f"max |noisy - stream| {worst:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_noisy_batch_split_and_clip(backend):
    device = require(backend)
    u8 = kit.u8_images(n=5, h=8, w=8, seed=1, device=device)
    kw = dict(factor=10.0, sigma_mult=0.1, seed=3, offset=64, backend=backend)
    noisy, _ = N.make_noisy_batch(u8, **kw)
    assert noisy.min().item() == -1.0 and noisy.max().item() == 1.0
    if backend != "reference":  # counter-based: a split batch gives the same bits
        head, _ = N.make_noisy_batch(u8[:2], **kw)
        tail, _ = N.make_noisy_batch(u8[2:], **{**kw, "offset": 64 + 2 * 64})
        assert torch.equal(torch.cat([head, tail]), noisy)
    raw, _ = N.make_noisy_batch(u8, clip=False, **kw)
    assert raw.min().item() < -1.0 and raw.max().item() > 1.0


def test_reference_backend_and_batch_reference():
    u8 = kit.u8_images(n=3, seed=2)
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


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_backends_reject_float64(backend):
    device = require(backend)
    with pytest.raises(TypeError, match="float64"):
        N.add_speckle_noise(X.double().to(device), backend=backend)


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
