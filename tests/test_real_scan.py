"""The real-scan judge (metrics/real_scan.py) against closed forms, and speckle-denoise --metrics.

Closed forms and their tolerances:
- a constant image: no speckle, no edge, no black (or all black), no AC energy: the figures are
  None or exact zeros; a constant shift d of the output moves the local mean by exactly d.
- a blurred edge v = a + b Phi((x - x0) / w): at distance t from x0 its gradient at measuring
  scale s is b phi(t / S) / S, S = sqrt(w^2 + s^2). The selected pixels sit at t = 1/2 (x0 is
  half-way between two columns), so blurring w0 -> w1 keeps phi(0.5/S1) S0 / (phi(0.5/S0) S1).
  Sampling aliases by exp(-2 pi^2 S^2) < 3e-9; the taps' truncation at 4 s leaves out
  2 phi(4) / 2 phi(0) = 3.4e-4 of the derivative filter's absolute mass, which bounds each
  gradient's relative error, so the ratio is allowed 1e-3 (a measuring scale of 1.5 instead of
  1 would move it by 0.09).
- pure Rayleigh speckle (independent pixels): mu / sigma = sqrt(pi / (4 - pi)) = 1.913 and
  ENL = pi / (4 - pi) = 3.660, within 5 delta-method standard errors (test_speckle_metrics.py
  derives them) of the mean over the 8 windows, which the tissue mask fixes (choosing the
  lowest-std windows of a larger field would bias both up).
- the checkerboard share: 1 for a pure period-2 pattern (to rounding); for white noise each
  window's 2x2-periodic energy is sigma^2 chi^2_3 against sigma^2 chi^2_{N-1}, so the pooled
  share over K windows is 3 / (N - 1) within 5 sqrt(6 K) / (K (N - 1)).
"""
import json
import math

import numpy as np
import pytest
import torch

from speckle_models.metrics import real_scan as R
from tests.test_speckle_metrics import central_from_raw, se_ratio

SQRT2PI = math.sqrt(2 * math.pi)


def rayleigh(shape, rng):
    return np.hypot(rng.standard_normal(shape), rng.standard_normal(shape))


def test_constant_image():
    frame = np.full((64, 80), 0.5)
    row = R.judge(frame, frame)
    assert row["enl_before"] is None and row["enl_ratio"] is None      # sigma = 0: reported as undefined
    assert row["mean_abs_delta"] == 0.0 and row["mean_corr"] is None
    assert row["edge_pixels"] == 0 and row["edge_ratio"] is None
    assert row["black_before"] is None and row["dark_windows"] == 0 and row["checker_after"] is None
    shifted = R.judge(frame, frame + 3 / 255)
    assert shifted["mean_abs_delta"] == pytest.approx(3.0, abs=1e-9)
    black = np.zeros((64, 80))
    row = R.judge(black, black + 2 / 255)
    assert row["black_pixels"] == 64 * 80 and row["black_before"] == 0.0
    assert row["black_after"] == pytest.approx(2.0, abs=1e-9)
    assert row["checker_before"] == 0.0 and row["checker_after"] == 0.0    # flat: no AC energy
    assert R.meets_targets(row)["black_after"] is True and R.meets_targets(row)["enl_ratio"] is None


def edge(width: float, size=64):
    from scipy.special import ndtr

    x = np.arange(size, dtype=np.float64)
    profile = 0.2 + 0.6 * ndtr((x - (size / 2 - 0.5)) / width) if width > 0 else 0.2 + 0.6 * (x >= size / 2)
    return np.tile(profile, (size, 1))


@pytest.mark.parametrize("w0,w1", [(1.0, 2.0), (1.5, 1.5), (0.8, 3.0)])
def test_blurred_edge_of_known_width(w0, w1):
    s = R.EDGE_MEASURE_SIGMA
    s0, s1 = math.hypot(w0, s), math.hypot(w1, s)
    expected = (math.exp(-0.125 / s1 ** 2) / s1) / (math.exp(-0.125 / s0 ** 2) / s0)
    row = R.judge(edge(w0), edge(w1))
    assert row["edge_pixels"] == round(R.EDGE_FRACTION * 64 * 64)
    assert row["edge_ratio"] == pytest.approx(expected, rel=1e-3), (row["edge_ratio"], expected)
    wrong = (math.exp(-0.125 / (w1 ** 2 + 2.25)) / math.hypot(w1, 1.5)) / (
        math.exp(-0.125 / (w0 ** 2 + 2.25)) / math.hypot(w0, 1.5))
    if w0 != w1:  # the tolerance tells the documented measuring scale from a 1.5 px one
        assert abs(wrong - expected) > 20 * 1e-3 * expected
    # a blur also moves the local mean next to the edge, but never its correlation far from 1
    assert row["mean_corr"] > 0.99


def test_pure_rayleigh_speckle():
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    frame = rayleigh((16, 16 * 15), rng) / 6.0                  # mean 0.21 > DARK_LEVEL
    tissue = np.zeros(frame.shape, bool)
    for k in range(R.WINDOWS):                                  # 8 disjoint windows, gaps between
        tissue[:, 32 * k:32 * k + 16] = True
    row = R.judge(frame, frame, tissue=tissue)
    assert row["windows"] == R.WINDOWS
    moments = central_from_raw(*(2 ** (k / 2) * math.gamma(1 + k / 2) for k in (1, 2, 3, 4)))
    se = se_ratio(*moments, 256) / math.sqrt(R.WINDOWS)
    snr = math.sqrt(math.pi / (4 - math.pi))
    assert abs(row["snr_before"] - snr) <= 5 * se
    assert abs(row["enl_before"] - snr ** 2) <= 5 * 2 * snr * se
    assert row["enl_ratio"] == 1.0 and row["edge_ratio"] in (None, 1.0)
    # an 8-look average of intensity would have ENL 8 in intensity; a plain 2x gain keeps ENL
    assert R.judge(frame, 0.5 * frame, tissue=tissue)["enl_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_checkerboard_share():
    n = 64
    i, j = np.indices((n, n))
    pattern = 0.05 + 0.01 * (-1.0) ** (i + j)
    row = R.judge(np.full((n, n), 0.05), pattern)
    assert row["dark_windows"] == (n // R.CHECKER_WINDOW) ** 2
    assert row["checker_after"] == pytest.approx(1.0, rel=1e-12)
    # a 2x2 tile repeated (the transposed convolution's print) is all period-2 energy too
    tile = np.array([[0.0, 0.02], [0.01, 0.03]])
    assert R.judge(np.full((n, n), 0.05), 0.04 + np.tile(tile, (n // 2, n // 2)))["checker_after"] == \
        pytest.approx(1.0, rel=1e-12)
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    size = 256
    noise = 0.08 + 0.01 * rng.standard_normal((size, size))
    k = (size // R.CHECKER_WINDOW) ** 2
    n_px = R.CHECKER_WINDOW ** 2
    got = R.judge(noise, noise)["checker_before"]
    assert abs(got - 3 / (n_px - 1)) <= 5 * math.sqrt(6 * k) / (k * (n_px - 1))


def test_black_and_local_mean():
    rng = np.random.default_rng(int(torch.randint(1 << 30, ())))
    frame = np.zeros((64, 96))
    frame[:, 48:] = np.clip(rayleigh((64, 48), rng) / 4, 0, 1)
    veiled = frame + 5 / 255
    row = R.judge(frame, veiled)
    assert row["black_pixels"] > R.MIN_BLACK and row["black_before"] == 0.0
    assert row["black_after"] == pytest.approx(5.0, abs=1e-9)
    assert row["mean_abs_delta"] == pytest.approx(5.0, abs=1e-9) and row["mean_corr"] == pytest.approx(1.0)
    met = R.meets_targets(row)
    assert met["black_after"] is False and met["mean_abs_delta"] is False


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="differ in shape"):
        R.judge(np.zeros((32, 32)), np.zeros((32, 33)))
    with pytest.raises(ValueError, match="one \\(H, W\\) frame"):
        R.judge(np.zeros((2, 32, 32)), np.zeros((2, 32, 32)))
    with pytest.raises(ValueError, match="non-finite"):
        R.judge(np.full((32, 32), np.nan), np.zeros((32, 32)))
    with pytest.raises(ValueError, match="tissue mask is empty"):
        R.judge(np.zeros((32, 32)), np.zeros((32, 32)), tissue=np.zeros((32, 32), bool))


def test_speckle_denoise_metrics_apply_the_judge(tmp_path, capsys):
    from PIL import Image

    from tests.denoise_helpers import cli, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", "br-unet")
    rng = np.random.default_rng(0)
    frame = np.zeros((64, 96))
    frame[:, 32:] = np.clip(rayleigh((64, 64), rng) / 5, 0, 1)
    Image.fromarray(np.rint(frame * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    rc, err = cli([ckpt, tmp_path / "scan.png", "--out", tmp_path / "out", "--metrics"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    row = doc["images"][0]
    assert set(R.FIELDS) <= set(row) and set(row["targets_met"]) == set(R.TARGETS)
    assert row["tissue_pixels"] > 0 and len(row["window_boxes"]) == row["windows"] > 0
    assert set(row["calibration"]) == set(R.CALIBRATION)
    assert row["calibration"]["median 5"]["enl_ratio"] > 1.5         # a median smooths speckle
    header, line = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert header.split(",")[4:4 + len(R.FIELDS)] == list(R.FIELDS)   # one column a figure, once
    assert "edge_preservation" not in header and "judge_" not in header
    met = [v for v in row["targets_met"].values() if v is not None]
    assert f"{sum(met)}/{len(met)}" in line.split(",")
