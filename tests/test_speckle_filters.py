"""models.speckle_filters against literal per-pixel implementations written out here.

Each reference below is the filter's equations applied one pixel at a time with nested Python
loops and numpy, in float64, with the same padding (numpy.pad "reflect" for the windows,
"edge" for SRAD's zero-flux border). The torch functions run in float64 too, so both sides
carry only round-off: a pixel is a few hundred float64 operations on values of order 1
(windows of at most 49 pixels, divisions by local variances of order 0.05), i.e. errors of
order 1e-13 (2^-53 ~ 1.1e-16 times a few hundred, times the 1/variance amplification). The
tolerance ATOL = 1e-10 leaves a factor ~1000 above that, while any difference in the
equations (a missing 1 + C_u^2, another padding, a shifted neighbour) changes pixels by more
than 1e-4.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from speckle_models.reproduction.speckle_filters import (EPS, HOMOGENEOUS_FLOOR, frost_filter, kuan_filter, lee_filter,
                                    speckle_cv2, srad)

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-10
SHAPES = [(3, 9, 11), (3, 12, 7)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def random_images(shape, *, zeros=False) -> torch.Tensor:
    """Fresh uniform draws in [0.05, 0.95] (conftest reseeds per test); optionally a block of
    exact zeros (an anechoic region) in image 0."""
    x = 0.05 + 0.9 * torch.rand(shape, dtype=torch.float64)
    if zeros:
        x[0, :3, :4] = 0.0
    return x


# ---------------------------------------------------------------- literal references (numpy)

def lit_window_stats(img: np.ndarray, w: int):
    """Per-pixel mean and variance of the w x w reflect-padded window, one pixel at a time."""
    p = w // 2
    P = np.pad(img, p, mode="reflect")
    H, W = img.shape
    m = np.empty((H, W))
    v = np.empty((H, W))
    for i in range(H):
        for j in range(W):
            win = P[i:i + w, j:j + w]
            m[i, j] = win.mean()
            v[i, j] = ((win - m[i, j]) ** 2).mean()
    return m, v


def lit_cv2(img: np.ndarray, w: int) -> float:
    """Lower median of v / m^2 over pixels with m > HOMOGENEOUS_FLOOR * image mean; 0 if none."""
    m, v = lit_window_stats(img, w)
    floor = HOMOGENEOUS_FLOOR * img.mean()
    vals = []
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            if m[i, j] > floor:
                vals.append(v[i, j] / (m[i, j] * m[i, j]))
    if not vals:
        return 0.0
    vals.sort()
    return vals[(len(vals) - 1) // 2]


def lit_lee_kuan(img: np.ndarray, w: int, cu2, factor: float, kuan: bool) -> np.ndarray:
    m, v = lit_window_stats(img, w)
    c = factor * (lit_cv2(img, w) if cu2 is None else cu2)
    out = np.empty_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            var_x = max(v[i, j] - c * m[i, j] ** 2, 0.0)
            if kuan:
                var_x /= 1.0 + c
            k = var_x / v[i, j] if v[i, j] > 0 else 0.0
            out[i, j] = m[i, j] + k * (img[i, j] - m[i, j])
    return np.clip(out, 0.0, 1.0)


def lit_frost(img: np.ndarray, w: int, damping: float) -> np.ndarray:
    p = w // 2
    P = np.pad(img, p, mode="reflect")
    m, v = lit_window_stats(img, w)
    out = np.empty_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            alpha = damping * v[i, j] / max(m[i, j] ** 2, EPS * EPS)
            num = den = 0.0
            for a in range(w):
                for b in range(w):
                    weight = math.exp(-alpha * math.hypot(a - p, b - p))
                    num += weight * P[i + a, j + b]
                    den += weight
            out[i, j] = num / den
    return np.clip(out, 0.0, 1.0)


def lit_srad(img: np.ndarray, iterations: int, dt: float, q0, q0_factor: float, rho: float,
             window: int) -> np.ndarray:
    q = q0_factor * (math.sqrt(lit_cv2(img, window)) if q0 is None else q0)
    q = max(q, EPS)
    I = img.copy()
    H, W = I.shape
    for n in range(iterations):
        q0t2 = (q * math.exp(-rho * n * dt)) ** 2
        P = np.pad(I, 1, mode="edge")                 # zero flux across the border
        dN, dS, dW, dE, c = (np.empty((H, W)) for _ in range(5))
        for i in range(H):
            for j in range(W):
                Ic = I[i, j]
                dN[i, j] = P[i, j + 1] - Ic           # neighbour (i-1, j)
                dS[i, j] = P[i + 2, j + 1] - Ic       # neighbour (i+1, j)
                dW[i, j] = P[i + 1, j] - Ic           # neighbour (i, j-1)
                dE[i, j] = P[i + 1, j + 2] - Ic       # neighbour (i, j+1)
                Is = max(Ic, EPS)
                G2 = (dN[i, j] ** 2 + dS[i, j] ** 2 + dW[i, j] ** 2 + dE[i, j] ** 2) / Is ** 2
                L = (dN[i, j] + dS[i, j] + dW[i, j] + dE[i, j]) / Is
                q2 = (0.5 * G2 - L * L / 16.0) / (1.0 + 0.25 * L) ** 2
                c[i, j] = min(max(1.0 / (1.0 + (q2 - q0t2) / (q0t2 * (1.0 + q0t2))), 0.0), 1.0)
        C = np.pad(c, 1, mode="edge")
        new = np.empty((H, W))
        for i in range(H):
            for j in range(W):
                div = (C[i + 2, j + 1] * dS[i, j] + c[i, j] * dN[i, j]
                       + C[i + 1, j + 2] * dE[i, j] + c[i, j] * dW[i, j])
                new[i, j] = I[i, j] + dt * div
        I = new
    return np.clip(I, 0.0, 1.0)


def per_image(fn, x: torch.Tensor) -> np.ndarray:
    return np.stack([fn(img) for img in x.numpy()])


def assert_close(got: torch.Tensor, want: np.ndarray, atol: float = ATOL):
    got = got.detach().cpu().numpy()
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= atol, f"max |torch - literal| = {err:.3g} > {atol:g}"


# ---------------------------------------------------------------- torch vs literal, float64

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [3, 5, 7])
def test_speckle_cv2_matches_literal(shape, window):
    x = random_images(shape)
    got = speckle_cv2(x, window, dtype=torch.float64)
    want = np.array([lit_cv2(img, window) for img in x.numpy()])
    assert np.abs(got.numpy() - want).max() <= ATOL
    assert (want > 0).all()


@pytest.mark.parametrize("kuan", [False, True], ids=["lee", "kuan"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window,cu2,factor", [(3, None, 1.0), (5, None, 0.5), (7, 0.05, 1.0),
                                               (5, 0.3, 2.0)])
def test_lee_kuan_match_literal(kuan, shape, window, cu2, factor):
    x = random_images(shape, zeros=window == 5)
    fn = kuan_filter if kuan else lee_filter
    got = fn(x, window, cu2=cu2, cu2_factor=factor, dtype=torch.float64)
    want = per_image(lambda im: lit_lee_kuan(im, window, cu2, factor, kuan), x)
    assert_close(got, want)
    assert np.abs(want - x.numpy()).max() > 1e-3        # the filter did something


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window,damping", [(3, 0.0), (3, 4.0), (5, 1.0), (7, 30.0)])
def test_frost_matches_literal(shape, window, damping):
    x = random_images(shape, zeros=window == 5)
    got = frost_filter(x, window, damping=damping, dtype=torch.float64)
    assert_close(got, per_image(lambda im: lit_frost(im, window, damping), x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations,dt,q0,q0_factor,rho,window", [
    (4, 0.25, None, 1.0, 1 / 6, 7), (3, 0.1, 0.3, 1.0, 0.0, 7), (5, 0.2, None, 0.5, 0.5, 3),
    (0, 0.25, 0.2, 1.0, 1 / 6, 5)])
def test_srad_matches_literal(shape, iterations, dt, q0, q0_factor, rho, window):
    x = random_images(shape, zeros=iterations == 5)
    got = srad(x, iterations, dt=dt, q0=q0, q0_factor=q0_factor, rho=rho, window=window,
               dtype=torch.float64)
    want = per_image(lambda im: lit_srad(im, iterations, dt, q0, q0_factor, rho, window), x)
    assert_close(got, want)


def test_float32_default_close_to_float64_literal():
    # float32 carries ~6e-8 relative round-off per operation; a few hundred operations and the
    # 1/variance amplification stay below 1e-5, so 1e-4 bounds it with margin.
    x = random_images((3, 9, 11))
    cases = [(lee_filter(x, 5), lambda im: lit_lee_kuan(im, 5, None, 1.0, False)),
             (kuan_filter(x, 5), lambda im: lit_lee_kuan(im, 5, None, 1.0, True)),
             (frost_filter(x, 5, damping=2.0), lambda im: lit_frost(im, 5, 2.0)),
             (srad(x, 3), lambda im: lit_srad(im, 3, 0.25, None, 1.0, 1 / 6, 7))]
    for got, ref in cases:
        assert got.dtype == torch.float32
        assert_close(got.double(), per_image(ref, x), atol=1e-4)


# ---------------------------------------------------------------- layout, dtype, device

FILTERS = {"lee": lambda x, **k: lee_filter(x, 3, **k), "kuan": lambda x, **k: kuan_filter(x, 3, **k),
           "frost": lambda x, **k: frost_filter(x, 3, **k), "srad": lambda x, **k: srad(x, 3, **k)}


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_device(name, device):
    fn = FILTERS[name]
    x = random_images((4, 12, 7)).to(device)
    x_before = x.clone()
    y = fn(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    assert torch.equal(x, x_before)                                 # input untouched
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    y4 = fn(x[:, None], dtype=torch.float64)                        # (N, 1, H, W) layout
    assert y4.shape == (4, 1, 12, 7) and y4.dtype == torch.float64
    y64 = fn(x, dtype=torch.float64)
    assert torch.equal(y4[:, 0], y64)
    # batched == one image at a time: no mixing between images
    alone = torch.cat([fn(x[i:i + 1], dtype=torch.float64) for i in range(4)])
    assert (alone - y64).abs().max().item() <= ATOL
    assert fn(x.half()).dtype == torch.float32                      # any float input is cast
    if device == "cuda":                                            # same numbers as on the CPU
        assert (y64.cpu() - fn(x.cpu(), dtype=torch.float64)).abs().max().item() <= ATOL


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", FILTERS)
def test_bad_images_raise(name):
    fn = FILTERS[name]
    x = random_images((2, 9, 11))
    with pytest.raises(ValueError, match=r"\(9, 11\)"):
        fn(x[0])
    with pytest.raises(ValueError, match=r"\(2, 2, 9, 11\)"):
        fn(torch.stack([x, x], 1))
    with pytest.raises(TypeError, match="torch.int64"):
        fn((x * 255).long())
    with pytest.raises(TypeError, match="ndarray"):
        fn(x.numpy())
    with pytest.raises(TypeError, match="torch.float16"):
        fn(x, dtype=torch.float16)


@pytest.mark.parametrize("fn", [lee_filter, kuan_filter, frost_filter, speckle_cv2])
def test_bad_window_raises(fn):
    x = random_images((2, 12, 7))
    for bad in (4, 1, -3):
        with pytest.raises(ValueError, match=f"got {bad}"):
            fn(x, bad)
    with pytest.raises(ValueError, match="window 15 too large for 12x7"):
        fn(x, 15)
    assert fn(x, 13).shape[0] == 2                      # 13 // 2 = 6 < 7: still fits
    with pytest.raises(TypeError, match="5.0"):
        fn(x, 5.0)


def test_bad_parameters_raise():
    x = random_images((2, 9, 11))
    for call, text in [(lambda: srad(x, dt=0.3), r"dt must be > 0 and <= 0.25 .*got 0.3"),
                       (lambda: srad(x, dt=0.0), r"dt must be > 0 .*got 0.0"),
                       (lambda: srad(x, dt=float("nan")), "got nan"),
                       (lambda: srad(x, -1), "iterations must be >= 0, got -1"),
                       (lambda: srad(x, q0=0.0), "q0 .* got 0.0"),
                       (lambda: srad(x, rho=-0.5), "rho .* got -0.5"),
                       (lambda: srad(x, q0_factor=0), "q0_factor .* got 0"),
                       (lambda: srad(x, window=6), "window .* got 6"),
                       (lambda: frost_filter(x, damping=-1.0), "damping .* got -1.0"),
                       (lambda: lee_filter(x, cu2=-0.1), "cu2 .* got -0.1"),
                       (lambda: kuan_filter(x, cu2_factor=0.0), "cu2_factor .* got 0.0"),
                       (lambda: lee_filter(x, cu2=float("inf")), "got inf")]:
        with pytest.raises(ValueError, match=text):
            call()
    with pytest.raises(TypeError, match="2.5"):
        srad(x, 2.5)
    with pytest.raises(TypeError, match="'0.1'"):
        srad(x, dt="0.1")


# ---------------------------------------------------------------- speckle on a flat region

def _speckle(kind: str, shape) -> tuple[torch.Tensor, float]:
    """Unit-mean speckle and its variance C_u^2."""
    if kind == "rayleigh":    # amplitude R = sqrt(-2 ln U), mean sqrt(pi/2), var 2 - pi/2
        u = torch.rand(shape, dtype=torch.float64)
        return torch.sqrt(-2.0 * torch.log1p(-u)) / math.sqrt(math.pi / 2), 4 / math.pi - 1
    shape_k = 4.0             # gamma(4, 1/4): 4-look intensity, mean 1, variance 1/4
    g = torch.distributions.Gamma(torch.tensor(shape_k, dtype=torch.float64),
                                  torch.tensor(shape_k, dtype=torch.float64))
    return g.sample(shape), 1 / shape_k


@pytest.mark.parametrize("kind", ["rayleigh", "gamma"])
@pytest.mark.parametrize("name", ["lee", "kuan", "frost", "srad"])
def test_flat_region_speckle_reduced_mean_kept(kind, name):
    c, shape = 0.15, (4, 64, 64)
    u, cu2 = _speckle(kind, shape)
    z = c * u        # P(z > 1) per pixel < 1e-8 for both laws: no clipping to undo the mean
    fn = {"lee": lee_filter, "kuan": kuan_filter, "frost": frost_filter, "srad": srad}[name]
    y = fn(z, dtype=torch.float64)
    n = z.numel()
    se = c * math.sqrt(cu2 / n)      # standard error of the input's pixel mean
    # The input mean is within 5 standard errors of c; every output pixel is a weighted
    # average of input pixels (weights that depend on the data), which moves the mean by at
    # most as much again. SRAD's update is conservative: the mean stays to round-off.
    assert abs(z.mean().item() - c) <= 5 * se
    assert abs(y.mean().item() - z.mean().item()) <= (1e-12 if name == "srad" else 5 * se)
    # At least a 4x variance reduction (a w x w box mean of independent speckle gives 1/w^2).
    assert y.var().item() <= z.var().item() / 4
    est = speckle_cv2(z, dtype=torch.float64)     # and the C_u^2 estimate finds the speckle
    assert (est - cu2).abs().max().item() <= 0.25 * cu2
