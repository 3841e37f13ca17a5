"""The statistics of speckle-reproduce's tables: mean ± std over seeds, and a percentile
bootstrap interval for the mean of paired per-image differences.

    mean_std(values)             -> (mean, sample std with n - 1; None for a single value)
    bootstrap_mean_ci(d, ...)    -> {"mean", "low", "high", "n", "resamples", "level", "seed"}

The bootstrap (Efron & Tibshirani 1993, ch. 13, the percentile interval): draw `resamples`
samples of the n differences with replacement from a numpy Generator seeded with `seed` (so a
table is reproducible), take each sample's mean, and return the (1 - level) / 2 and
(1 + level) / 2 quantiles of those means. The interval is over the test images only: it says
whether the mean difference would hold on other images like these, not across training seeds.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0
_CHUNK = 250               # resamples drawn at once (bounds the index array to 250 x n)


def mean_std(values) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"mean_std needs a non-empty 1-d sequence, got shape {v.shape}")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def bootstrap_mean_ci(diffs, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      level: float = BOOTSTRAP_LEVEL, seed: int = BOOTSTRAP_SEED) -> dict:
    """Percentile bootstrap interval of the mean of `diffs` (one value per test image)."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"bootstrap_mean_ci needs a non-empty 1-d sequence, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("bootstrap_mean_ci: the differences must be finite")
    if not (isinstance(resamples, int) and resamples >= 1) or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples!r}, {level!r}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        means[start:start + m] = d[rng.integers(0, d.size, size=(m, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size),
            "resamples": resamples, "level": level, "seed": seed}


def excludes_zero(ci: dict) -> bool:
    return ci["low"] > 0 or ci["high"] < 0


def finite_or_none(x):
    """x for JSON: None in place of NaN or an infinity."""
    return x if x is None or math.isfinite(x) else None
