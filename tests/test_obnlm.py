"""OBNLM (Coupé et al. 2009) against a direct float64 loop over blocks and offsets, and its
behaviour on speckle."""
import math

import numpy as np
import pytest
import torch

from speckle_models.reproduction.obnlm import EPS, noise_variance, obnlm

pytestmark = pytest.mark.usefixtures("one_thread")


def obnlm_loops(u: np.ndarray, h_factor: float, gamma: float, m: int, a: int) -> np.ndarray:
    """The paper's blockwise estimator written out: for every block centre y (the image
    widened by a), Pearson-distance weights to every offset in the search window, the centre's
    weight the largest of the others, normalized; a pixel is the mean of the P estimates of the
    blocks containing it."""
    h, w = u.shape
    pad = m + 2 * a
    big = np.pad(u, pad, mode="reflect")
    sigma2 = noise_variance(torch.from_numpy(u)[None, None], gamma).item()
    h2 = h_factor * 2 * sigma2

    def block(z, x):                     # image coordinates of the centre
        return big[z + pad - a:z + pad + a + 1, x + pad - a:x + pad + a + 1]

    offsets = [(dz, dx) for dz in range(-m, m + 1) for dx in range(-m, m + 1)]
    weights = {}
    for z in range(-a, h + a):
        for x in range(-a, w + a):
            ref = block(z, x)
            ws = {}
            for dz, dx in offsets:
                if (dz, dx) == (0, 0):
                    continue
                other = block(z + dz, x + dx)
                d = np.mean((ref - other) ** 2 / np.maximum(other, EPS) ** (2 * gamma))
                ws[(dz, dx)] = math.exp(-d / h2)
            ws[(0, 0)] = max(ws.values())
            total = sum(ws.values())
            weights[(z, x)] = {k: v / total for k, v in ws.items()}
    out = np.zeros_like(u)
    p = (2 * a + 1) ** 2
    for z in range(h):
        for x in range(w):
            acc = 0.0
            for bz in range(z - a, z + a + 1):
                for bx in range(x - a, x + a + 1):
                    for (dz, dx), wt in weights[(bz, bx)].items():
                        acc += wt * big[z + dz + pad, x + dx + pad]
            out[z, x] = acc / p
    return out


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_matches_the_loops(gamma):
    torch.manual_seed(2)
    u = (0.3 + 0.4 * (torch.arange(10)[None, :] > 4) * torch.ones(9, 1)
         ) * torch.distributions.Gamma(4.0, 4.0).sample((9, 10))
    u = u.double()
    want = obnlm_loops(u.numpy(), 1.3, gamma, 2, 1)
    got = obnlm(u[None], h_factor=1.3, gamma=gamma, search=2, block=1, dtype=torch.float64)[0]
    assert np.abs(got.numpy() - want).max() < 1e-12
    # float32: within rounding of the float64 result
    got32 = obnlm(u[None], h_factor=1.3, gamma=gamma, search=2, block=1)[0]
    assert np.abs(got32.double().numpy() - want).max() < 1e-5


def test_batch_and_shape_and_constant():
    x = torch.rand(3, 1, 12, 14, dtype=torch.float64) + 0.1
    batched = obnlm(x, search=2, block=1, dtype=torch.float64)
    alone = torch.cat([obnlm(x[i:i + 1], search=2, block=1, dtype=torch.float64) for i in range(3)])
    assert batched.shape == x.shape and torch.allclose(batched, alone, atol=1e-14)
    flat = torch.full((2, 10, 10), 0.4)
    assert torch.allclose(obnlm(flat, search=2, block=1), flat, atol=1e-6)


def test_reduces_speckle_and_keeps_an_edge():
    """Two flat halves (0.2 and 0.6) under unit-mean gamma(4) speckle: OBNLM (gamma 0.5, h at
    the noise level) lowers the error well below the input's, and near the edge below a box
    filter of its search window's size, which blurs the edge (0.0106 against 0.0181 here; the
    flat parts are as good as the box's)."""
    torch.manual_seed(0)
    clean = torch.where(torch.arange(32)[None, :] < 16, 0.2, 0.6) * torch.ones(32, 1)
    clean = clean.expand(4, 32, 32).double()
    noisy = clean * torch.distributions.Gamma(4.0, 4.0).sample(clean.shape).double()
    out = obnlm(noisy, h_factor=1.0, gamma=0.5, dtype=torch.float64)
    box = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(noisy[:, None], (5, 5, 5, 5), mode="reflect"),
                                         11, stride=1)[:, 0]
    err = lambda y: ((y - clean) ** 2).mean().item()   # noqa: E731
    assert err(out) < 0.25 * err(noisy)
    edge = (slice(None), slice(4, -4), slice(12, 20))
    assert ((out - clean)[edge] ** 2).mean() < 0.75 * ((box - clean)[edge] ** 2).mean()


def test_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        obnlm(torch.full((1, 8, 8), -0.1))
    with pytest.raises(ValueError, match="search"):
        obnlm(torch.rand(1, 8, 8), search=0)
    with pytest.raises(ValueError, match="h_factor"):
        obnlm(torch.rand(1, 8, 8), h_factor=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        obnlm(torch.rand(8, 8))
    with pytest.raises(TypeError):
        obnlm(np.ones((1, 8, 8)))
