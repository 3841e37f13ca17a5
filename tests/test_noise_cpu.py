"""What only the C++ speckle-noise kernel (csrc/cpu/speckle_noise_cpu.cpp) has: its lane
paths (16 AVX-512, 8 AVX2, 1 portable) and their bits, thread-count independence, the op's own
argument checks, and its normals against float64.

Stream equality and moments are every backend's, in tests/test_noise.py; here each built lane
path runs the kit's stream cases (speckle_kernels/testing/noise.py) with the kit's tolerance.
"""
from __future__ import annotations

import pytest
import torch

from speckle_kernels import _ext, noise_ext

from speckle_kernels.testing import noise as kit
from .helpers import assert_close

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")

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


@pytest.mark.parametrize("case", kit.STREAM_CASES, ids=lambda c: c.id)
def test_each_lane_path_follows_the_stream(case, lanes):
    x = kit.stream_input(case)
    y = noise_ext.add_speckle_noise(x, **case.kwargs())
    tol = kit.stream_tolerance(x, out_dtype=case.dtype, **case.kwargs())
    assert (y.float() - kit.expected_noise(x, **case.kwargs())).abs().max().item() <= tol


def test_shapes_and_splitting():
    # 0-d and 1-d tensors are one image; rows k: with offset + k*numel_per_image repeat the batch
    for x in (torch.rand(()), torch.rand(1000), torch.rand(2, 3, 4, 5).permute(0, 2, 3, 1)):
        kw = dict(seed=3, sigma_mult=(0.1, 0.5))
        assert_close(noise_ext.add_speckle_noise(x, **kw), kit.expected_noise(x.contiguous(), **kw),
                     atol=kit.stream_tolerance(x, **kw), rtol=0, name=f"shape {tuple(x.shape)}")
    assert noise_ext.add_speckle_noise(torch.rand(0, 3)).shape == (0, 3)
    u8 = torch.randint(0, 256, (6, 1, 20, 30), dtype=torch.uint8)
    whole, _ = noise_ext.make_noisy_batch(u8, seed=9, offset=4, sigma_mult=(0.1, 0.75))
    part, _ = noise_ext.make_noisy_batch(u8[2:], seed=9, offset=4 + 2 * 600, sigma_mult=(0.1, 0.75))
    assert torch.equal(whole[2:], part)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("distribution", ["gaussian", "rayleigh"])
def test_noisy_batch_on_each_lane_path(out_dtype, distribution, lanes):
    u8 = torch.randint(0, 256, (4, 1, 19, 23), dtype=torch.uint8)
    kw = dict(seed=42, offset=7, distribution=distribution, sigma_mult=(0.1, 0.75))
    noisy, clean = noise_ext.make_noisy_batch(u8, out_dtype=out_dtype, **kw)
    v = u8.float() / 255.0
    assert noisy.dtype == clean.dtype == out_dtype
    assert torch.equal(clean, (2.0 * v - 1.0).to(out_dtype))
    tol = 2 * kit.stream_tolerance(v, out_dtype=out_dtype, **kw)  # noisy = 2y - 1
    assert (noisy.float() - (2.0 * kit.expected_noise(v, **kw) - 1.0)).abs().max().item() <= tol


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
    from speckle_kernels.philox import U32 as _U32
    from speckle_kernels.philox import philox4x32_10, uniform_torch

    numel, seed, offset = 1 << 20, 20251125, 3
    e = offset + torch.arange(numel, dtype=torch.int64)
    zero = torch.zeros_like(e)
    r0, r1, r2, r3 = philox4x32_10(seed, e & _U32, e >> 32, zero, zero)

    def oracle(ru, rc):
        u = uniform_torch(ru).clamp_min(1e-7).double()
        theta = (torch.tensor(6.283185307179586, dtype=torch.float32) * uniform_torch(rc)).double()
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
