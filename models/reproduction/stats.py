"""The statistics of speckle-reproduce's tables: mean ± std over seeds, bootstrap intervals of
paired differences (over images, or over seeds and images), bootstrap p-values and Holm's
correction.

    mean_std(values)                 -> (mean, sample std with n - 1; None for a single value)
    bootstrap_mean_ci(d, ...)        -> one level: the images of one run
    two_level_bootstrap(per_seed)    -> two levels: seeds, then images within each seed
    holm(p_values)                   -> Holm-adjusted p-values, in the input's order

Two-level bootstrap (Davison & Hinkley 1997, section 3.8, the nested case): per_seed[s] holds
the paired differences d_{s,i} of seed s's test images (each seed is a replicate of the whole
experiment: phantom draw, split, training, tuning of the filters, test images). The statistic
is the mean over seeds of the per-seed mean difference (every seed weighs the same). A
resample draws S seeds with replacement, then, for each drawn seed, n_s of its images with
replacement, and takes the same statistic; `resamples` of them (a numpy Generator seeded
`seed`, so a table is reproducible) give the percentile interval, the (1 - level) / 2 and
(1 + level) / 2 quantiles. With few seeds the outer level has few distinct outcomes (3 seeds:
10), and the percentile interval of a mean of S values is narrower than a t interval by about
sqrt((S - 1) / S) t_{S-1}; with one seed it is the image bootstrap.

Bootstrap p-value (the percentile interval inverted): p = min(1, 2 min(a, b)) with
a = (#{means <= 0} + 1) / (B + 1), b = (#{means >= 0} + 1) / (B + 1): the smallest
1 - level at which the interval excludes 0 (so the smallest reachable p is about 2 / B).

Holm (1979): sort the m p-values, p_(1) <= ... <= p_(m); adjusted p_(j) = max over i <= j of
min(1, (m - i + 1) p_(i)); a comparison is significant at alpha when its adjusted p < alpha.
This controls the family-wise error rate over all m comparisons of a table.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
TWO_LEVEL_RESAMPLES = 10000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0
ALPHA = 0.05
_CHUNK = 250               # resamples drawn at once (bounds the index arrays)


def mean_std(values) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"mean_std needs a non-empty 1-d sequence, got shape {v.shape}")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _check_level(resamples, level):
    if not (isinstance(resamples, int) and resamples >= 1) or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples!r}, {level!r}")


def bootstrap_mean_ci(diffs, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile bootstrap interval of the mean of `diffs` (one value per test image)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"bootstrap_mean_ci needs a non-empty 1-d sequence, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("bootstrap_mean_ci: the differences must be finite")
    _check_level(resamples, level)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        means[start:start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size),
            "resamples": resamples, "level": level, "seed": seed}


def bootstrap_p(means: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 0 from resampled statistics (module docstring)."""
    b = means.size
    below = (np.count_nonzero(means <= 0) + 1) / (b + 1)
    above = (np.count_nonzero(means >= 0) + 1) / (b + 1)
    return float(min(1.0, 2.0 * min(below, above)))


def two_level_bootstrap(per_seed, *, resamples: int = TWO_LEVEL_RESAMPLES,
                        level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """Interval and p-value of the mean paired difference over seeds and images.

    per_seed: a sequence of 1-d arrays, one per seed (finite; lengths may differ). Returns
    {"mean", "low", "high", "p", "seeds", "n" (images per seed), "resamples", "level", "seed",
    "per_seed_means"}.
    """
    groups = [np.asarray(d, dtype=np.float64) for d in per_seed]
    if not groups or any(g.ndim != 1 or g.size == 0 for g in groups):
        raise ValueError("two_level_bootstrap needs one non-empty 1-d array per seed")
    if not all(np.isfinite(g).all() for g in groups):
        raise ValueError("two_level_bootstrap: the differences must be finite")
    _check_level(resamples, level)
    s = len(groups)
    sizes = np.array([g.size for g in groups])
    width = int(sizes.max())
    padded = np.zeros((s, width))
    for k, g in enumerate(groups):
        padded[k, :g.size] = g
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        seeds = rng.integers(0, s, size=(m, s))                          # outer level
        n = sizes[seeds]                                                  # (m, s)
        images = (rng.random((m, s, width)) * n[..., None]).astype(np.int64)
        used = np.arange(width) < n[..., None]                            # draw n_s of them
        values = padded[seeds[..., None], images] * used
        means[start:start + m] = (values.sum(2) / n).mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    per_seed_means = [float(g.mean()) for g in groups]
    return {"mean": float(np.mean(per_seed_means)), "low": float(low), "high": float(high),
            "p": bootstrap_p(means), "seeds": s, "n": [int(v) for v in sizes],
            "resamples": resamples, "level": level, "seed": seed, "per_seed_means": per_seed_means}


def holm(p_values) -> list[float]:
    """Holm-adjusted p-values (module docstring), in the order given."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("holm needs a 1-d sequence of p-values in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def excludes_zero(ci: dict) -> bool:
    return ci["low"] > 0 or ci["high"] < 0


def finite_or_none(x):
    """x for JSON: None in place of NaN or an infinity."""
    return x if x is None or math.isfinite(x) else None
