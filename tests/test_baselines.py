"""reproduction.baselines: the filters in the tuned baselines, the domains, their timing, optional BM3D."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from speckle_models.reproduction import baselines
from speckle_models.reproduction import speckle_filters
from speckle_models.reproduction.baselines import (AXES, DESIGN_DOMAIN, FILTERS, TORCH_FILTERS, apply_all,
                                                  apply_filter, available_filters, bm3d_denoise,
                                                  from_domain, missing_filters, run_baselines,
                                                  to_domain, tune)

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_BM3D = importlib.util.find_spec("bm3d") is not None
RESULT_KEYS = {"params", "domain", "marks", "val_psnr", "domains", "denoised", "val_denoised", "time_s",
               "seconds_per_image", "tune_time_s", "n_images", "device"}


def speckled(n: int, h: int = 20, w: int = 20):
    """(noisy, clean) float64 stacks: smooth images times unit-mean gamma(4) speckle."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    phase = torch.rand(n, 1, 1, dtype=torch.float64) * 6
    clean = 0.3 + 0.2 * torch.sin(3 * xx + 2 * yy + phase)
    speckle = torch.distributions.Gamma(torch.tensor(4.0, dtype=torch.float64),
                                        torch.tensor(4.0, dtype=torch.float64)).sample(clean.shape)
    return (clean * speckle).clamp(0, 1).numpy(), clean.numpy()


def test_grids_and_names():
    assert set(TORCH_FILTERS) | {"bm3d"} <= set(FILTERS)
    assert set(FILTERS) == set(baselines.DISPLAY_NAMES) == set(DESIGN_DOMAIN)
    for name in FILTERS:
        assert AXES[name] and all(len(a.values) >= 2 for a in AXES[name].values()), name
    assert all(w % 2 == 1 for name in ("lee", "kuan", "frost") for w in AXES[name]["window"].values)
    assert {DESIGN_DOMAIN[f] for f in ("lee", "kuan", "frost", "srad")} == {"intensity"}


def test_domains_round_trip_with_the_log_bias():
    """Intensity = 10^((v - 1) 55 dB / 10); back, less the -2.51 dB mean log of fully developed
    speckle: a value scaled by 10^(2.51 / 10) (a mean intensity) lands on the gray level v."""
    from speckle_models.data.phantom import DISPLAY_DB, RAYLEIGH_LOG_BIAS_DB

    v = np.linspace(0.1, 0.95, 7)
    assert np.array_equal(from_domain(to_domain(v, "display"), "display"), v)
    i = to_domain(v, "intensity")
    assert i[-1] == pytest.approx(10 ** (-0.05 * DISPLAY_DB / 10)) and np.all(np.diff(i) > 0)
    back = from_domain(i * 10 ** (RAYLEIGH_LOG_BIAS_DB / 10), "intensity")
    assert np.allclose(back, v, atol=1e-12)
    assert np.allclose(from_domain(i, "intensity"), v - RAYLEIGH_LOG_BIAS_DB / DISPLAY_DB)
    assert from_domain(np.array([0.0, 5.0]), "intensity").tolist() == [0.0, 1.0]      # clipped
    # a filter on intensities: the box mean of a speckled patch, recompressed, sits on the mean
    # gray level of that patch (the log-domain mean), not 2.51 dB above it
    rng = np.random.default_rng(0)
    patch = 0.6 + (10 * np.log10(rng.exponential(1.0, (64, 64)))) / DISPLAY_DB
    out = apply_all("lee", patch[None], None, "intensity", window=31, cu2_factor=64.0)
    assert abs(out[0, 16:-16, 16:-16].mean() - patch.mean()) < 0.01


@pytest.mark.parametrize("name", TORCH_FILTERS)
def test_torch_filters_run_on_the_whole_stack(name, monkeypatch):
    noisy, _ = speckled(3)
    params = {k: a.values[0] for k, a in AXES[name].items()}
    calls = []
    from speckle_models.reproduction import obnlm as obnlm_module

    module = obnlm_module if name == "obnlm" else speckle_filters
    real = getattr(module, {"srad": "srad", "obnlm": "obnlm"}.get(name, f"{name}_filter"))

    def spy(x, **kw):
        calls.append(tuple(x.shape))
        return real(x, **kw)

    monkeypatch.setattr(module, real.__name__, spy)
    out = apply_all(name, noisy, **params)
    assert calls == [(3, 20, 20)]                   # one batched call, not one per image
    assert out.shape == noisy.shape and out.dtype == np.float64
    extra = {"gamma": 0.5} if name == "obnlm" else {}
    want = real(torch.from_numpy(noisy), **params, **extra).double().clamp(0, 1).numpy()
    assert np.array_equal(out, want)
    one = apply_filter(name, noisy[1], **params)    # the single-image entry point agrees
    assert np.abs(one - out[1]).max() <= 1e-6       # float32, batched vs alone


def test_run_baselines_tunes_times_and_keeps_keys():
    val_noisy, val_clean = speckled(3)
    test_noisy, test_clean = speckled(4)
    names = ("median", "lee", "kuan", "frost", "srad")
    out = run_baselines(val_noisy, val_clean, test_noisy, filters=names, domains=("display", "intensity"))
    assert tuple(out) == names
    for name, res in out.items():
        assert set(res) == RESULT_KEYS, name
        assert set(res["params"]) == set(AXES[name])
        # its design domain and display values: both for the speckle filters, one for median
        assert set(res["domains"]) == ({"display"} if name == "median" else {"display", "intensity"})
        chosen = res["domains"][res["domain"]]
        assert res["params"] == chosen["params"] == tune(name, val_noisy, val_clean, None, res["domain"])["params"]
        assert res["val_psnr"] == max(d["val_psnr"] for d in res["domains"].values())
        assert all(res["params"][k] in chosen["grid"][k] for k in res["params"])
        assert res["denoised"].shape == test_noisy.shape and res["val_denoised"].shape == val_noisy.shape
        assert res["n_images"] == 4 and res["device"] == "cpu"
        assert res["time_s"] > 0 and res["seconds_per_image"] == pytest.approx(res["time_s"] / 4)
        assert res["tune_time_s"] > 0
        # every tuned filter beats the noisy input on these speckled images
        assert baselines._psnr(res["denoised"], test_clean) > baselines._psnr(test_noisy, test_clean), name
    with pytest.raises(ValueError, match="domains"):
        run_baselines(val_noisy, val_clean, test_noisy, filters=["lee"], domains=("log",))


def test_run_baselines_rejects_unknown_names():
    noisy, clean = speckled(1)
    with pytest.raises(ValueError, match="'wiener'"):
        run_baselines(noisy, clean, noisy, filters=["lee", "wiener"])


def test_bm3d_absent_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)     # makes `import bm3d` fail
    assert "bm3d" in missing_filters() and "pip install bm3d" in missing_filters()["bm3d"]
    assert "non-commercial" in missing_filters()["bm3d"]
    assert "bm3d" not in available_filters() and "srad" in available_filters()
    noisy, clean = speckled(1, 12, 12)
    with pytest.raises(ImportError, match="pip install bm3d"):
        bm3d_denoise(noisy[0], 0.1)
    with pytest.raises(ImportError, match="bm3d"):
        run_baselines(noisy, clean, noisy, filters=["lee", "bm3d"])
    out = run_baselines(noisy, clean, noisy)            # default: the available filters only
    assert tuple(out) == available_filters()


@pytest.mark.skipif(not HAS_BM3D, reason="optional package bm3d not installed (pip install bm3d)")
def test_bm3d_wrapper_denoises_a_tiny_image():
    assert "bm3d" not in missing_filters() and "bm3d" in available_filters()
    yy, xx = np.mgrid[0:24, 0:24] / 23.0
    clean = 0.3 + 0.4 * ((xx > 0.5) ^ (yy > 0.4))      # a blocky image with sharp edges
    noisy = clean + 0.1 * torch.randn(24, 24, dtype=torch.float64).numpy()
    out = bm3d_denoise(noisy, 0.1)
    assert out.shape == clean.shape and out.dtype == np.float64
    assert ((out - clean) ** 2).mean() < 0.5 * ((noisy - clean) ** 2).mean()
    with pytest.raises(ValueError, match="got 0.0"):
        bm3d_denoise(noisy, 0.0)
    with pytest.raises(ValueError, match=r"\(2, 24, 24\)"):
        bm3d_denoise(np.stack([noisy, noisy]), 0.1)
    via_table = apply_filter("bm3d", noisy, sigma_factor=1.0)
    assert via_table.shape == clean.shape and 0.0 <= via_table.min() and via_table.max() <= 1.0
    # (the bm3d binary is not bit-reproducible between calls: ~1e-7)
    assert np.allclose(via_table, np.clip(bm3d_denoise(noisy, baselines.noise_sigma(noisy)), 0, 1), atol=1e-5)
