"""The C++ speckle-noise kernels (csrc/cpu/speckle_noise_cpu.cpp) against the stream of noise.py.

The C++ port must give the numbers of the Triton kernel for a (seed, offset): checked against
reference.noise_fields / image_uniforms (the stream in torch integer ops) and, where Triton is
installed, the Triton kernel under its interpreter. The integer words are exact; log, cos and
sqrt may differ by a few ulp (Sleef vs libm), so |n| <= ~6 gives absolute differences of a few
1e-6 on y in [0, 1]: atol = 1e-5.
"""
from __future__ import annotations

import pytest
import torch

from speckle_kernels import noise
from speckle_kernels import _ext, noise_ext
from speckle_kernels.reference import image_uniforms, noise_fields

from .helpers import assert_close

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")

SEEDS = [(0, 0), (1234567890123, 99), (7, 2**32 - 5)]  # the last crosses the counter's hi word
# The kernel's paths (csrc/cpu/speckle_noise_cpu.cpp): 16 lanes (AVX-512), 8 (AVX2), 1 (portable).
BUILT_WIDTHS = (tuple(torch.ops.speckle_kernels.cpu_noise_lane_widths())
                if _ext is not None and _ext.HAS_CPU_EXT else ())


@pytest.fixture(params=[16, 8, 1], ids=lambda w: f"lanes{w}")
def lanes(request, monkeypatch):
    """Runs a test on each built path of the kernel (the default is the widest)."""
    if request.param not in BUILT_WIDTHS:
        pytest.skip(f"the {request.param}-lane path is not built here (built: {BUILT_WIDTHS})")
    monkeypatch.setenv("SPECKLE_CPU_NOISE_LANES", str(request.param))
    return request.param


def expected_noise(x, *, seed, offset, distribution, factor=1.0, sigma_mult=0.1, sigma_add=0.02, clip=True):
    """y from the documented stream, in fp32."""
    images = x.shape[0] if x.dim() >= 2 else 1
    per_image = x.numel() // images
    n1, n2 = noise_fields(x.numel(), seed=seed, offset=offset, distribution=distribution)
    if isinstance(sigma_mult, tuple):
        u = image_uniforms(images, per_image, seed=seed, offset=offset)
        sigma = (sigma_mult[0] + (sigma_mult[1] - sigma_mult[0]) * u).repeat_interleave(per_image)
    else:
        sigma = torch.full((x.numel(),), float(sigma_mult))
    y = x.float().flatten() * (1 + factor * sigma * n1) + sigma_add * n2
    return (y.clamp(0, 1) if clip else y).view(x.shape)


@pytest.mark.parametrize("seed,offset", SEEDS, ids=str)
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
@pytest.mark.parametrize("sigma_mult", [0.3, (0.1, 0.75)], ids=["fixed", "per_image"])
def test_matches_documented_stream(seed, offset, distribution, sigma_mult, lanes):
    x = torch.rand(5, 1, 33, 29)
    kw = dict(seed=seed, offset=offset, distribution=distribution, sigma_mult=sigma_mult, factor=5.0)
    for clip in (True, False):
        y = noise_ext.add_speckle_noise(x, clip=clip, **kw)
        assert_close(y, expected_noise(x, clip=clip, **kw), atol=1e-5, rtol=1e-5, name=f"y clip={clip}")


@pytest.mark.parametrize("dtype,ulp", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)], ids=str)
def test_half_precision_rounds_once(dtype, ulp):
    x = torch.rand(3, 2, 17, 9).to(dtype)
    y = noise_ext.add_speckle_noise(x, seed=5, offset=11)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected_noise(x, seed=5, offset=11, distribution="gaussian"), atol=ulp, rtol=ulp, name="y")


def test_shapes_and_splitting():
    # 0-d and 1-d tensors are one image; rows k: with offset + k*numel_per_image repeat the batch
    for x in (torch.rand(()), torch.rand(1000), torch.rand(2, 3, 4, 5).permute(0, 2, 3, 1)):
        assert_close(noise_ext.add_speckle_noise(x, seed=3, sigma_mult=(0.1, 0.5)),
                     expected_noise(x.contiguous(), seed=3, offset=0, distribution="gaussian", sigma_mult=(0.1, 0.5)),
                     atol=1e-5, rtol=1e-5, name=f"shape {tuple(x.shape)}")
    assert noise_ext.add_speckle_noise(torch.rand(0, 3)).shape == (0, 3)
    u8 = torch.randint(0, 256, (6, 1, 20, 30), dtype=torch.uint8)
    whole, _ = noise_ext.make_noisy_batch(u8, seed=9, offset=4, sigma_mult=(0.1, 0.75))
    part, _ = noise_ext.make_noisy_batch(u8[2:], seed=9, offset=4 + 2 * 600, sigma_mult=(0.1, 0.75))
    assert torch.equal(whole[2:], part)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
def test_noisy_batch(out_dtype, distribution, lanes):
    u8 = torch.randint(0, 256, (4, 1, 19, 23), dtype=torch.uint8)
    noisy, clean = noise_ext.make_noisy_batch(u8, seed=42, offset=7, distribution=distribution,
                                         sigma_mult=(0.1, 0.75), out_dtype=out_dtype)
    v = u8.float() / 255.0
    y = expected_noise(v, seed=42, offset=7, distribution=distribution, sigma_mult=(0.1, 0.75))
    tol = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out_dtype]
    assert noisy.dtype == clean.dtype == out_dtype
    assert torch.equal(clean, (2.0 * v - 1.0).to(out_dtype))
    assert_close(noisy, 2.0 * y - 1.0, atol=tol, rtol=tol, name="noisy")
    single = noise_ext.add_speckle_noise(v, seed=42, offset=7, distribution=distribution, sigma_mult=(0.1, 0.75))
    assert_close(noisy.float(), 2 * single - 1, atol=tol, rtol=tol, name="batch vs add_speckle_noise")


def test_same_numbers_as_triton_interpreter():
    pytest.importorskip("triton")
    from speckle_kernels._backend import triton_interpreting
    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    x = torch.rand(3, 1, 16, 20)
    for distribution in ("gaussian", "rayleigh"):
        kw = dict(seed=2**40 + 3, offset=123, distribution=distribution, sigma_mult=(0.1, 0.75), factor=5.0)
        assert_close(noise_ext.add_speckle_noise(x, **kw), noise.add_speckle_noise(x, backend="triton", **kw),
                     atol=1e-5, rtol=1e-5, name=distribution)
    u8 = torch.randint(0, 256, (2, 1, 8, 9), dtype=torch.uint8)
    for got, want in zip(noise_ext.make_noisy_batch(u8, seed=1, offset=2),
                         noise.make_noisy_batch(u8, seed=1, offset=2, backend="triton")):
        assert_close(got, want, atol=2e-5, rtol=1e-5, name="batch")


def test_independent_of_thread_count():
    x = torch.rand(8, 1, 64, 65)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(noise_ext.add_speckle_noise(x, seed=11, sigma_mult=(0.1, 0.9)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("call,pattern", [
    (lambda: noise_ext.add_speckle_noise(torch.randint(0, 5, (3, 4))), "float32, float16 or bfloat16"),
    (lambda: noise_ext.add_speckle_noise(torch.rand(3, 4).double()), "got Double"),
    (lambda: noise_ext.add_speckle_noise(torch.rand(3, 4), seed=-1), "seed and offset must be >= 0"),
    (lambda: noise_ext.add_speckle_noise(torch.rand(3, 4), sigma_mult=(0.5, 0.1)), "sigma_low <= sigma_high"),
    (lambda: noise_ext.make_noisy_batch(torch.rand(2, 1, 4, 4)), "clean_u8 must be uint8"),
    (lambda: noise_ext.make_noisy_batch(torch.zeros(2, 4, 4, dtype=torch.uint8)), "must be 4-d"),
    (lambda: noise_ext.make_noisy_batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), out_dtype=torch.int32),
     "out_dtype must be float32, bfloat16 or float16"),
])
def test_bad_arguments_raise(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()
    with pytest.raises(ValueError, match="distribution"):
        noise_ext.add_speckle_noise(torch.rand(3), distribution="poisson")


def test_lane_widths_give_the_same_bits(monkeypatch):
    # 16 and 8 lanes run the same operations in the same order; the portable path (Sleef's log
    # and cos) is held to the float64 bound of the next test instead.
    if not {8, 16} <= set(BUILT_WIDTHS):
        pytest.skip(f"needs the 16- and 8-lane paths (built: {BUILT_WIDTHS})")
    x = torch.rand(7, 1, 77, 65)
    u8 = torch.randint(0, 256, (3, 1, 40, 50), dtype=torch.uint8)
    outs = []
    for width in (16, 8):
        monkeypatch.setenv("SPECKLE_CPU_NOISE_LANES", str(width))
        outs.append([noise_ext.add_speckle_noise(x, seed=2**40 + 5, offset=2**32 - 100, factor=5.0,
                                            sigma_mult=(0.1, 0.7), distribution=d, clip=False)
                     for d in ("gaussian", "rayleigh")]
                    + list(noise_ext.make_noisy_batch(u8, seed=3, offset=1, out_dtype=torch.bfloat16)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_unknown_lane_width_is_refused(monkeypatch):
    monkeypatch.setenv("SPECKLE_CPU_NOISE_LANES", "32")
    with pytest.raises(ValueError, match=r"SPECKLE_CPU_NOISE_LANES must name a built path.*'32'"):
        noise_ext.add_speckle_noise(torch.rand(2, 3))


def test_standard_normals_against_the_stream_in_float64(lanes):
    # The kernel's log and cos are short polynomials (noise_lanes.h): measured <= 1.7 ulp
    # (log) and <= 2 ulp (sin on [-pi/2, pi/2]). So n = rho*cos(theta), rho = sqrt(-2 ln u), may
    # differ from the float64 value of the same float inputs (u, and the float angle theta of the
    # stream) by ~6 ulp relative through rho and the products, plus 2 ulp of 1 times rho through
    # cos: bound 8 * 2^-24 * |n| + 2^-22 * rho.
    from speckle_kernels.noise_stream import U32 as _U32
    from speckle_kernels.reference import _uniform_torch, philox4x32_10

    numel, seed, offset = 1 << 20, 20251125, 3
    e = offset + torch.arange(numel, dtype=torch.int64)
    zero = torch.zeros_like(e)
    r0, r1, r2, r3 = philox4x32_10(seed, e & _U32, e >> 32, zero, zero)

    def oracle(ru, rc):
        u = _uniform_torch(ru).clamp_min(1e-7).double()
        theta = (torch.tensor(6.283185307179586, dtype=torch.float32) * _uniform_torch(rc)).double()
        rho = torch.sqrt(-2.0 * torch.log(u))
        return rho * torch.cos(theta), rho

    kw = dict(seed=seed, offset=offset, distribution="gaussian", clip=False)
    # v = 1, factor*sigma = 1, sigma_add = 0: y = 1 + n1 (one more rounding: ulp(1 + n1) / 2)
    y1 = noise_ext.add_speckle_noise(torch.ones(1, numel), factor=1.0, sigma_mult=1.0, sigma_add=0.0, **kw)
    # v = 0, sigma_add = 1: y = n2 exactly
    y2 = noise_ext.add_speckle_noise(torch.zeros(1, numel), factor=1.0, sigma_mult=1.0, sigma_add=1.0, **kw)
    for got, (want, rho), extra in ((y1.flatten().double() - 1.0, oracle(r0, r1), 2.0**-21),
                                    (y2.flatten().double(), oracle(r2, r3), 0.0)):
        bound = 8 * 2.0**-24 * want.abs() + 2.0**-22 * rho + extra
        excess = (got - want).abs() - bound
        assert excess.max().item() <= 0, (
            f"{int((excess > 0).sum())} of {numel} beyond the bound; worst |diff| "
            f"{(got - want).abs().max().item():.3g}")
