"""The statistics and tuning of speckle-reproduce's tables: the two-level bootstrap, its p-value,
Holm's correction, the growing grid search, and the non-overlapping training orders."""
import math

import numpy as np
import pytest

from speckle_models.data.datasets import DeviceBatches, shuffle_seed
from speckle_models.reproduction.stats import bootstrap_p, holm, two_level_bootstrap
from speckle_models.reproduction.tuning import Axis, grid_search


# ----------------------------------------------------------------------------- two-level bootstrap

def test_two_level_bootstrap_sees_the_seed_spread():
    """Three seeds whose images agree closely but whose means differ (+0.37, -0.16, -0.25, the
    D-U-Net minus Frost spread of the old medium table): the image-only interval of the pooled
    differences is narrow, the two-level one spans the seeds' spread and contains 0."""
    rng = np.random.default_rng(0)
    per_seed = [m + 0.05 * rng.standard_normal(128) for m in (0.37, -0.16, -0.25)]
    ci = two_level_bootstrap(per_seed)
    assert ci["mean"] == pytest.approx(np.mean([d.mean() for d in per_seed]))
    assert ci["low"] < -0.15 and ci["high"] > 0.25 and ci["low"] < 0 < ci["high"]
    assert ci["p"] > 0.05
    pooled = np.concatenate(per_seed)
    half = 1.96 * pooled.std(ddof=1) / math.sqrt(pooled.size)
    assert ci["high"] - ci["low"] > 5 * 2 * half
    assert ci["seeds"] == 3 and ci["n"] == [128, 128, 128]


def test_two_level_bootstrap_known_cases():
    # every seed and image the same: a zero-width interval, p at its floor
    ci = two_level_bootstrap([np.full(10, 2.0)] * 3, resamples=999)
    assert ci["low"] == ci["high"] == ci["mean"] == 2.0
    assert ci["p"] == pytest.approx(2 / 1000)
    # one seed: the image bootstrap; two images (0, 1): resample means 0, 1/2, 1 -> [0, 1]
    ci = two_level_bootstrap([np.array([0.0, 1.0])])
    assert (ci["low"], ci["mean"], ci["high"]) == (0.0, 0.5, 1.0)
    # seeds of different sizes: each seed weighs the same in the statistic
    ci = two_level_bootstrap([np.zeros(100), np.ones(4)])
    assert ci["mean"] == 0.5
    # large, clearly positive: excluded 0, small p; reproducible for a seed
    rng = np.random.default_rng(1)
    d = [rng.normal(1.0, 1.0, 64) for _ in range(5)]
    ci = two_level_bootstrap(d)
    assert ci["low"] > 0 and ci["p"] < 0.01 and ci == two_level_bootstrap(d)
    assert two_level_bootstrap(d, seed=3)["low"] != ci["low"]
    for bad in ([], [np.array([])], [np.array([1.0, np.nan])]):
        with pytest.raises(ValueError):
            two_level_bootstrap(bad)


def test_two_level_interval_covers_the_truth():
    """Coverage by simulation: seed effects N(0, 0.3), image noise N(0, 1), 6 seeds x 40
    images, true mean 0. The nominal 95% interval of a mean of 6 seeds by the percentile
    bootstrap covers ~85-90% (it is narrower than a t interval by sqrt(5/6) t_5 / 1.96); it
    must not fall to what an image-only interval gives (~45% here)."""
    rng = np.random.default_rng(7)
    cover = 0
    trials = 60
    for t in range(trials):
        per_seed = [rng.normal(0, 0.3) + rng.normal(0, 1, 40) for _ in range(6)]
        ci = two_level_bootstrap(per_seed, resamples=800, seed=t)
        cover += ci["low"] <= 0 <= ci["high"]
    assert cover / trials > 0.72


def test_bootstrap_p_and_holm():
    assert bootstrap_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
    assert bootstrap_p(np.linspace(-1, 1, 101)) == 1.0
    # Holm: sorted p 0.01, 0.02, 0.04 with m = 3 -> 0.03, 0.04, 0.04 (monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.001] * 4) == pytest.approx([0.004] * 4)
    with pytest.raises(ValueError):
        holm([1.5])


# ----------------------------------------------------------------------------- grid search

def test_grid_grows_until_the_optimum_is_inside():
    calls = []

    def score(p):
        calls.append(dict(p))
        return -(math.log2(p["h"]) - 5.3) ** 2 - (p["w"] - 11) ** 2

    axes = {"h": Axis((0.5, 1.0, 2.0)), "w": Axis((3, 5, 7), grow="add", step=2, low=3, high=31, integer=True)}
    r = grid_search(axes, score)
    assert r["params"] == {"h": 32.0, "w": 11}              # log2 32 = 5 is nearest 5.3
    assert r["marks"] == {"h": None, "w": None}
    assert r["grid"]["h"][-1] == 64.0 and r["grid"]["w"][-1] == 13
    assert len(calls) == r["evaluated"] == len({tuple(c.items()) for c in calls})   # cached


def test_grid_marks_edges_and_bounds():
    # the optimum below the smallest window: stuck on the bound
    r = grid_search({"w": Axis((3, 5, 7), grow="add", step=2, low=3, high=31, integer=True)},
                    lambda p: -p["w"])
    assert r["params"] == {"w": 3} and r["marks"] == {"w": "bound"}
    # growth runs out of rounds: an edge
    r = grid_search({"h": Axis((1.0, 2.0))}, lambda p: p["h"], max_rounds=3)
    assert r["params"] == {"h": 16.0} and r["marks"] == {"h": "edge"} and r["rounds"] == 3
    # a fixed axis never grows and is never marked
    r = grid_search({"g": Axis((0.5, 1.0), grow="fixed")}, lambda p: p["g"])
    assert r["params"] == {"g": 1.0} and r["marks"] == {"g": None} and r["evaluated"] == 2
    # a non-finite score is never chosen
    r = grid_search({"h": Axis((1.0, 2.0, 4.0))}, lambda p: math.nan if p["h"] == 2.0 else -abs(p["h"] - 2.5))
    assert r["params"] == {"h": 4.0} or r["params"] == {"h": 1.0}
    with pytest.raises(ValueError):
        Axis((2.0, 1.0))
    with pytest.raises(ValueError):
        Axis((1.0,), grow="sideways")


# ----------------------------------------------------------------------------- training order

def test_shuffles_do_not_overlap_across_seeds():
    """Seeding the order with seed + epoch made seed 0's epoch e + 1 equal seed 1's epoch e."""
    import torch

    images = torch.zeros(50, 1, 4, 4, dtype=torch.uint8)
    a, b = DeviceBatches(images, 5, seed=0), DeviceBatches(images, 5, seed=1)
    orders = {(s, e): tuple(x.order(e).tolist()) for s, x in ((0, a), (1, b)) for e in range(4)}
    assert len(set(orders.values())) == len(orders)
    assert orders[(0, 1)] != orders[(1, 0)]
    assert shuffle_seed(0, 1) != shuffle_seed(1, 0) and shuffle_seed(3, 2) == shuffle_seed(3, 2)
    assert 0 <= shuffle_seed(2 ** 40, 7) < 2 ** 63
