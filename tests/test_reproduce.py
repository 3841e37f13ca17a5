"""The speckle-free target (pairs.py, evaluate.eval_pair) and speckle-reproduce at tiny sizes:
Gaussian and Rayleigh tables from one call, seeds, the bootstrap, the grid figure, resume."""
import csv
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from speckle_models.data.datasets import DeviceBatches, UltrasoundData
from speckle_models.metrics.psnr_ssim import psnr, ssim
from speckle_models.reproduction import baselines
from speckle_models.reproduction import tables as report
from speckle_models.reproduction import reproduce
from speckle_models.training import loop as L
from speckle_models.training import train as T
from speckle_models.training.config import VAL_NOISE_SEED, TrainConfig
from speckle_models.training.evaluate import eval_pair, image_scores, noisy_eval_set, predict
from speckle_models.training.pairs import PairBatches, normalize_u8
from speckle_models.reproduction.stats import bootstrap_mean_ci, excludes_zero, holm, mean_std, two_level_bootstrap

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out, **kw):
    base = dict(model="d-unet", out=str(out), noise_factor=1.0, epochs=1, batch_size=4, width=4,
                image_size=16, count=24, test_count=8, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- speckle-free

def test_pair_batches_match_device_batches(tiny_data):
    kw = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.02, distribution="rayleigh", seed=7)
    plain = DeviceBatches(tiny_data.train, 5, **kw)
    pairs = PairBatches(tiny_data.train, tiny_data.train_clean, 5, **kw)
    assert len(plain) == len(pairs) == 4                     # 19 images, a partial last batch
    for epoch in (0, 2):
        order = plain.order(epoch)
        for b, ((x0, c0), (x1, t1)) in enumerate(zip(plain.batches(epoch), pairs.batches(epoch))):
            assert torch.equal(x0, x1)                        # the same input, bit for bit
            idx = order[b * 5:(b + 1) * 5]
            assert torch.equal(t1, normalize_u8(tiny_data.train_clean[idx]))
            assert not torch.equal(t1, c0)
    # with the images as their own targets PairBatches is DeviceBatches
    same = PairBatches(tiny_data.train, tiny_data.train, 5, **kw)
    for (x0, c0), (x1, c1) in zip(plain.batches(1), same.batches(1)):
        assert torch.equal(x0, x1) and torch.equal(c0, c1)
    with pytest.raises(ValueError, match="differ in shape"):
        PairBatches(tiny_data.train, tiny_data.train_clean[:3], 5, **kw)


def test_speckle_free_target_trains_against_the_maps(tmp_path, tiny_data):
    # physical speckle only: no added noise at all
    config = tiny_config(tmp_path, target="speckle-free", noise_factor=0.0, sigma_add=0.0)
    result = L.train(config, data=tiny_data, plots=False)
    noisy, target = eval_pair(tiny_data, "val", result.config, VAL_NOISE_SEED, torch.device("cpu"))
    speckled, own = noisy_eval_set(tiny_data.val, result.config, VAL_NOISE_SEED, torch.device("cpu"))
    assert torch.equal(noisy, speckled) and torch.equal(noisy, own)   # zero noise: the input is the image
    assert torch.equal(target, normalize_u8(tiny_data.val_clean))
    scores = image_scores(predict(result.model, noisy), target)
    assert result.history[-1]["val_psnr"] == pytest.approx(scores["psnr"], abs=1e-9)
    assert result.history[-1]["val_psnr"] != pytest.approx(
        image_scores(predict(result.model, noisy), own)["psnr"], abs=1e-3)
    saved = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert saved["target"] == "speckle-free" and saved["noise_factor"] == 0.0
    # resuming with the other target is refused: target is a resume key
    with pytest.raises(ValueError, match="other settings.*target"):
        L.train(replace(config, target="clean"), data=tiny_data, resume=True)


def test_speckle_free_refused_without_maps(tmp_path, tiny_data, capsys, cache_dir):
    bare = UltrasoundData(train=tiny_data.train, val=tiny_data.val, test=tiny_data.test,
                          source="/data/kaggle")
    with pytest.raises(ValueError, match="speckle-free maps.*'/data/kaggle'"):
        L.train(tiny_config(tmp_path / "run", target="speckle-free"), data=bare)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="speckle-free maps"):
        eval_pair(bare, "test", tiny_config(tmp_path, target="speckle-free").resolved(), 1,
                  torch.device("cpu"))
    # end to end: a Kaggle-layout folder (8-bit 420x580 TIFFs) has no maps
    from PIL import Image
    folder = tmp_path / "kaggle"
    for part, n in (("train", 3), ("test", 1)):
        (folder / part).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((420, 580), 40 * i + 20, np.uint8)).save(folder / part / f"{i}.tif")
    with pytest.raises(SystemExit) as e:
        T.main(["--model", "d-unet", "--target", "speckle-free", "--data", str(folder),
                "--out", str(tmp_path / "k"), "--image-size", "16", "--device", "cpu",
                "--no-progress", "--cache-dir", cache_dir])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "speckle-free maps" in err and str(folder) in err
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--target", "speckle-free", "--data", str(folder), "--out", str(tmp_path / "k"),
                        "--image-size", "16", "--device", "cpu", "--no-progress", "--cache-dir", cache_dir])
    assert e.value.code == 2 and "speckle-free maps" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


# ----------------------------------------------------------------------------- statistics

def test_bootstrap_known_cases():
    # constant differences: every resample has the same mean, a zero-width interval
    ci = bootstrap_mean_ci(np.full(37, 1.25))
    assert ci["low"] == ci["high"] == ci["mean"] == pytest.approx(1.25)
    assert excludes_zero(ci) and not excludes_zero(bootstrap_mean_ci(np.zeros(5)))
    # two images (0, 1): resample means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of 2000 of them are 0 and 1
    ci = bootstrap_mean_ci([0.0, 1.0])
    assert (ci["low"], ci["mean"], ci["high"]) == (0.0, 0.5, 1.0)
    # symmetric about 0: the interval contains 0 and is about symmetric
    sym = np.concatenate([np.linspace(0.1, 2, 40), -np.linspace(0.1, 2, 40)])
    ci = bootstrap_mean_ci(sym)
    assert ci["low"] < 0 < ci["high"] and not excludes_zero(ci)
    assert abs(ci["low"] + ci["high"]) < 0.1 * (ci["high"] - ci["low"])
    # large n: close to the normal interval mean +- 1.96 sd / sqrt(n)
    d = np.random.default_rng(5).normal(0.3, 1.0, 400)
    ci = bootstrap_mean_ci(d)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert ci["low"] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert ci["high"] == pytest.approx(d.mean() + half, abs=0.15 * half)
    # reproducible for a seed, another seed draws other resamples
    assert bootstrap_mean_ci(d) == bootstrap_mean_ci(d, seed=0)
    assert bootstrap_mean_ci(d, seed=1)["low"] != ci["low"]
    assert ci["n"] == 400 and ci["resamples"] == 2000 and ci["level"] == 0.95
    for bad in ([], [1.0, np.inf], np.zeros((2, 2))):
        with pytest.raises(ValueError):
            bootstrap_mean_ci(bad)


def test_mean_std():
    assert mean_std([3.0]) == (3.0, None)
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))


# ----------------------------------------------------------------------------- speckle-reproduce

TINY = ["--preset", "quick", "--image-size", "16", "--count", "24", "--test-count", "8",
        "--epochs", "1", "--batch-size", "4", "--width", "4", "--device", "cpu", "--no-progress"]
FILTERS = ["median", "lee", "frost", "obnlm"]
MAIN = ["--models", "d-unet", "di-conv-ae", "--noise", "both", "--factors", "1", "10",
        "--rayleigh-sigmas", "0.5", "--seeds", "2", "--baseline-count", "4", "--filters", *FILTERS]


@pytest.fixture(scope="module")
def both_tables(tmp_path_factory, cache_dir):
    """One speckle-reproduce call: Gaussian x1, x10 and Rayleigh sigma 0.5, two networks, two
    seeds. The grid figure's rows are recorded on their way to plots.method_grid."""
    out = tmp_path_factory.mktemp("rep")
    grids = []
    real = report.method_grid

    def spy(rows, path, **kw):
        grids.append((path.name, rows))
        return real(rows, path, **kw)

    report.method_grid = spy
    try:
        assert reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, *MAIN]) == 0
    finally:
        report.method_grid = real
    return out, grids


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_noise_tables_from_one_call(both_tables):
    out, grids = both_tables
    for name in ("table2_gaussian", "table2_rayleigh"):
        for ext in (".md", ".csv", ".json"):
            assert (out / f"{name}{ext}").stat().st_size > 0
        for fig in ("val_loss", "grid", "intervals"):
            assert _png(out / f"{name}_{fig}.png")
    assert not [p for p in out.rglob(".*")]                     # no temp files left
    gauss = (out / "table2_gaussian.md").read_text()
    assert "D-U-Net x1" in gauss and "Di-Conv-AE-Net x10" in gauss and "24.93" in gauss
    ray = (out / "table2_rayleigh.md").read_text()
    assert "σ=0.5" in ray and "24.93" not in ray                  # the paper's table is Gaussian only
    assert "standardized" not in ray or "zero mean, unit variance" in ray
    assert "R ~ Rayleigh(1) (zero mean, unit variance)" in ray
    for text in (gauss, ray):
        for name in ("median", "Lee", "Frost", "OBNLM", "noisy input",
                     "two-level bootstrap", "Holm", "BM3D: not run"):
            assert name in text, name
    # each seed is its own experiment: its own phantom draw and split
    ckpt = torch.load(out / "runs" / "table2_rayleigh" / "di-conv-ae-sigma0.5-s1" / "checkpoint.pt",
                      weights_only=True)["config"]
    assert (ckpt["distribution"], ckpt["noise_factor"], ckpt["sigma_mult"], ckpt["seed"]) == ("rayleigh", 1.0, 0.5, 1)
    assert ckpt["phantom_seed"] == 1 and ckpt["phantom_version"] == 3
    # the grid: one row per level; clean, noisy, every filter, every network
    assert [g[0] for g in grids] == ["table2_gaussian_grid.png", "table2_rayleigh_grid.png"]
    rows = grids[0][1]
    assert [r[0] for r in rows] == ["x1", "x10"]
    names = [n for n, _ in rows[0][1]]
    assert names[:2] == ["clean", "noisy"] and names[-2:] == ["D-U-Net", "Di-Conv-AE-Net"]
    assert len(names) == 4 + len(FILTERS)
    assert all(img.shape[-2:] == (16, 16) and 0 <= img.min() and img.max() <= 1
               for _, images in rows for _, img in images)


def test_seeds_give_mean_and_std(both_tables):
    out, _ = both_tables
    doc = json.loads((out / "table2_gaussian.json").read_text())
    per_image = doc["per_image_per_seed"]
    for level in ("x1", "x10"):
        for model in ("d-unet", "di-conv-ae"):
            row = doc["summary"][level]["rows"][model]
            per = row["per_seed"]["psnr"]
            assert len(per) == 2 and len(set(per)) == 2
            assert per == pytest.approx([np.mean(v) for v in per_image[level][model]["psnr"]])
            assert row["mean"]["psnr"] == pytest.approx(np.mean(per))
            assert row["std"]["psnr"] == pytest.approx(np.std(per, ddof=1))
            # a 255 data range on [0, 1] images pushes SSIM to ~1 (the paper's 0.9999)
            assert row["ssim_range255"] > 0.99 > row["mean"]["ssim"]
            assert row["seconds_per_image"] > 0
    # the two seeds drew different phantoms: their test images differ
    noisy = per_image["x1"]["noisy"]["psnr"]
    assert len(noisy) == 2 and noisy[0] != noisy[1]


def test_best_filter_per_metric_on_validation_and_two_level_intervals(both_tables):
    out, _ = both_tables
    doc = json.loads((out / "table2_rayleigh.json").read_text())
    s = doc["summary"]["sigma0.5"]
    per = doc["per_image_per_seed"]["sigma0.5"]
    for metric in ("psnr", "ssim"):
        best = max(s["filters"], key=lambda f: s["filters"][f]["val"][metric])
        assert s["best_filter"][metric] == best
        for model in ("d-unet", "di-conv-ae"):
            c = s["comparisons"][model][metric]
            assert c["filter"] == best
            d = [np.array(a) - np.array(b) for a, b in zip(per[model][metric], per[best][metric])]
            want = two_level_bootstrap(d)
            assert c["mean"] == pytest.approx(want["mean"]) and c["low"] == pytest.approx(want["low"])
            assert c["p"] == pytest.approx(want["p"]) and c["seeds"] == 2
            assert c["low"] <= c["mean"] <= c["high"]
    # Holm over every comparison of the table: 2 networks x 2 metrics x 1 level
    found = [c for per_m in s["comparisons"].values() for c in per_m.values()]
    assert all(c["family"] == 4 for c in found)
    assert [c["p_holm"] for c in found] == pytest.approx(holm([c["p"] for c in found]))
    for f, r in s["filters"].items():
        assert len(r["params"]) == 2 and set(r["domain"]) == {"display"}, f
    rows = list(csv.DictReader(io.StringIO((out / "table2_rayleigh.csv").read_text())))
    nets = [r for r in rows if r["kind"] == "network"]
    assert len(nets) == 2 and all(r["dpsnr_vs"] and r["dpsnr_low"] and r["dpsnr_p_holm"] for r in nets)
    assert {r["kind"] for r in rows} == {"input", "filter", "network"}


def test_resume_reuses_runs_scores_and_filters(both_tables, cache_dir, monkeypatch):
    out, _ = both_tables
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    old = json.loads((out / "table2_gaussian.json").read_text())

    def boom(*a, **k):
        raise AssertionError("recomputed on --resume")

    monkeypatch.setattr(reproduce, "evaluate_run", boom)
    monkeypatch.setattr(baselines, "run_baselines", boom)
    assert reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, *MAIN, "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == before
    new = json.loads((out / "table2_gaussian.json").read_text())
    assert new["summary"] == old["summary"] and new["per_image_per_seed"] == old["per_image_per_seed"]
    # a seed run on its own (another process) is picked up by the run over all seeds
    one = ["--seeds", "1", "--seed", "1"]
    assert reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, *MAIN, *one, "--resume"]) == 0
    # without --resume finished runs are not silently trained again
    with pytest.raises(SystemExit):
        reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, *MAIN])


def test_reproduce_speckle_free_table(tmp_path, cache_dir, tiny_data):
    out = tmp_path / "despeckle"
    assert reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, "--target", "speckle-free",
                           "--models", "d-unet", "--factors", "0", "--sigma-add", "0",
                           "--baseline-count", "3", "--filters", "lee", "median"]) == 0
    text = (out / "despeckle_gaussian.md").read_text()
    assert text.startswith("# Despeckling") and "target speckle-free" in text and "24.93" not in text
    assert "none added: the phantom's physical speckle only" in text and "speckle only" in text
    for name in ("gCNR", "Pratt's FOM", "β", "speckle SNR", "ENL", "the target", "design domain"):
        assert name in text, name
    doc = json.loads((out / "despeckle_gaussian.json").read_text())
    s = doc["summary"]["x0"]
    # no added noise: the input row is the speckled image scored against its speckle-free map
    # (seed 0's phantom is tiny_data's: the same cache)
    speckled01, maps01 = tiny_data.test[:3].double() / 255, tiny_data.test_clean[:3].double() / 255
    assert s["rows"]["noisy"]["mean"]["psnr"] == pytest.approx(psnr(speckled01, maps01).mean().item(), abs=1e-4)
    assert s["rows"]["noisy"]["mean"]["ssim"] == pytest.approx(ssim(speckled01, maps01).mean().item(), abs=1e-4)
    assert s["rows"]["target"]["mean"]["fom"] == pytest.approx(1.0)
    assert s["comparisons"]["d-unet"]["psnr"]["n"] == [3]
    assert set(s["filters"]["lee"]["domain"]) <= {"display", "intensity"}
    assert s["filters"]["median"]["val_psnr_by_domain"].keys() == {"display"}
    assert "met" in s["target_check"]["d-unet"]
    cfg = torch.load(out / "runs" / "despeckle_gaussian" / "d-unet-x0-s0" / "checkpoint.pt",
                     weights_only=True)["config"]
    assert cfg["target"] == "speckle-free" and cfg["noise_factor"] == 0.0 and cfg["sigma_add"] == 0.0


def test_reproduce_cli_errors(tmp_path, capsys, cache_dir):
    out = tmp_path / "rep"
    for argv, msg in ((["--seeds", "0"], "--seeds must be >= 1"),
                      (["--noise", "speckle"], "invalid choice"),
                      (["--filters", "wiener"], "invalid choice"),
                      (["--target", "speckle-free", "--noise", "rayleigh"], "one table"),
                      (["--distribution", "rayleigh"], "unrecognized arguments")):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["--out", str(out), "--cache-dir", cache_dir, *TINY, *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not out.exists()
