"""speckle-reproduce's report of one table: the summary statistics, then <table>.md (tables_md.py),
.csv, .json, <table>_val_loss.png, <table>_grid.png and <table>_intervals.png, every file
written atomically.

How the numbers are made (the Markdown repeats this under "How the numbers are made"):
- Seeds: each seed s is a replicate of the whole experiment (its own phantom draw, split,
  initialisation, training noise and order, filter tuning, test images). Every method is
  scored on the same k test images of seed s.
- A method's value of a metric: for each seed the mean over its k test images (images where
  the metric is undefined, e.g. gCNR without a lesion, left out), then the mean ± sample std
  (n - 1) of those per-seed means over the seeds (no ± with one seed).
- Filters: tuned per seed on that seed's first validation images (best mean PSNR; the grid
  grows until the chosen values are inside it, tuning.py), in the filter's design domain and
  on display values (despeckling table; the paper's protocol: display values), the better on
  validation kept (baselines.py). Run time per image: the test images' run, tuning not
  included, on this table's device and CPU threads.
- Best filter, per metric: the filter with the highest validation mean of that metric
  (averaged over the seeds), never chosen on test images.
- Comparisons: for each network, level and compared metric, d_{s,i} = network - best filter
  (for that metric) on test image i of seed s; the mean over seeds of the per-seed mean d, a
  95% two-level bootstrap interval (seeds, then images within each seed; stats.py, 10000
  resamples, numpy generator seeded 0) and its bootstrap p-value; Holm's correction over every
  comparison of the table; * where the Holm-adjusted p < 0.05.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from speckle_models import DISPLAY_NAMES
from speckle_models.atomic_write import atomic_write_text
from speckle_models.plots import comparison_intervals, method_grid, table2_curves
from speckle_models.reproduction.baselines import BM3D_LICENSE, DESIGN_DOMAIN
from speckle_models.reproduction.baselines import DISPLAY_NAMES as FILTER_NAMES
from speckle_models.reproduction.scoring import COMPARED, METRICS
from speckle_models.reproduction.stats import ALPHA, holm, mean_std, two_level_bootstrap

STATS_NOTE = __doc__.split("(the Markdown repeats this under \"How the numbers are made\"):\n")[1]
TARGET_GAIN_DB = 1.0          # the despeckling target: a network >= 1 dB PSNR above the best filter


def settings_of(args, config, per_seed, noise, levels, device) -> dict:
    if noise == "gaussian" and all(lv.factor == 0 for lv in levels) and config.sigma_add == 0:
        model = "none added: the phantom's physical speckle only"
    elif noise == "gaussian":
        model = (f"y = x (1 + f * {config.sigma_mult:g} * n1) + {config.sigma_add:g} n2, n1 and n2 "
                 f"standard normal, f = {', '.join(f'{lv.factor:g}' for lv in levels)}")
    else:
        model = (f"y = x (1 + sigma * n1) + {config.sigma_add:g} n2, n1 = (R - sqrt(pi/2)) / "
                 f"sqrt(2 - pi/2) with R ~ Rayleigh(1) (zero mean, unit variance), n2 standard "
                 f"normal, sigma = {', '.join(f'{lv.sigma_mult:g}' for lv in levels)}")
    sizes = per_seed[0]["sizes"]
    return {"data": f"{config.data} (version {config.phantom_version}, one draw per seed)"
                    if config.data == "phantom" else config.data,
            "target": config.target, "image size": f"{config.image_size}x{config.image_size}",
            "train/val/test images per seed": "/".join(map(str, sizes)),
            "epochs": config.epochs, "batch": config.batch_size, "width": config.width,
            "seeds": ", ".join(str(r["seed"]) for r in per_seed), "noise": model,
            "scored": f"the first {per_seed[0]['k']} test images of each seed",
            "filters tuned on": f"the first {per_seed[0]['n_tune']} validation images of each seed",
            "device": str(device), "CPU threads": config.threads or torch.get_num_threads()}


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there is none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _arr(v) -> np.ndarray:
    return v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)


def _seed_means(per_seed_scores: list, metric: str) -> list:
    return [_nanmean(_arr(s[metric])) for s in per_seed_scores]


def _row(kind: str, name: str, per_seed_scores: list, metrics, **extra) -> dict:
    row = {"kind": kind, "name": name, "per_seed": {}, "mean": {}, "std": {}, **extra}
    for m in metrics:
        means = _seed_means(per_seed_scores, m)
        row["per_seed"][m] = means
        finite = [v for v in means if math.isfinite(v)]
        row["mean"][m], row["std"][m] = mean_std(finite) if finite else (math.nan, None)
    return row


def _diffs(a_scores: list, b_scores: list, metric: str) -> list:
    out = []
    for a, b in zip(a_scores, b_scores):
        d = _arr(a[metric]) - _arr(b[metric])
        d = d[np.isfinite(d)]
        if d.size:
            out.append(d)
    return out


def _compare(a_scores, b_scores, metric, filter_name) -> dict | None:
    d = _diffs(a_scores, b_scores, metric)
    return {"filter": filter_name, **two_level_bootstrap(d)} if d else None


def summarize(levels, models, per_seed, target) -> dict:
    metrics, compared = METRICS[target], COMPARED[target]
    out = {}
    for lv in levels:
        runs = [r["levels"][lv.slug] for r in per_seed]
        rows = {"noisy": _row("input", "noisy input", [r["noisy"] for r in runs], metrics)}
        if "target" in runs[0]:
            rows["target"] = _row("target", "speckle-free map (reference)", [r["target"] for r in runs], metrics)
        filters = {}
        for f in runs[0]["filters"]:
            fr = [r["filters"][f] for r in runs]
            rows[f] = _row("filter", FILTER_NAMES[f], [x["scores"] for x in fr], metrics,
                           seconds_per_image=float(np.mean([x["seconds_per_image"] for x in fr])))
            filters[f] = {"design_domain": DESIGN_DOMAIN[f], "domain": [x["domain"] for x in fr],
                          "params": [x["params"] for x in fr], "marks": [x["marks"] for x in fr],
                          "val": {m: _nanmean([x["val"][m] for x in fr]) for m in metrics},
                          "val_psnr_by_domain": {d: float(np.mean([x["domains"][d]["val_psnr"] for x in fr]))
                                                 for d in fr[0]["domains"]},
                          "tune_time_s": float(np.mean([x["tune_time_s"] for x in fr])),
                          "device": fr[0]["device"]}
        for m in models:
            nr = [r["nets"][m] for r in runs]
            rows[m] = _row("network", DISPLAY_NAMES[m], [x["scores"] for x in nr], metrics,
                           seconds_per_image=float(np.mean([x["seconds_per_image"] for x in nr])),
                           train_loss=float(np.mean([x["train_loss"] for x in nr])),
                           val_loss=float(np.mean([x["val_loss"] for x in nr])),
                           run_time_s=float(np.mean([x["run_time_s"] for x in nr])),
                           ssim_range255=float(np.mean([x["ssim_range255"] for x in nr])))
        best = {}
        for metric in compared:              # filters with a defined validation value only
            ok = [f for f in filters if math.isfinite(filters[f]["val"][metric])]
            if ok:
                best[metric] = max(ok, key=lambda f: filters[f]["val"][metric])
        comps = {}
        for m in models:
            comps[m] = {metric: _compare([r["nets"][m]["scores"] for r in runs],
                                         [r["filters"][best[metric]]["scores"] for r in runs],
                                         metric, best[metric]) for metric in best}
        out[lv.slug] = {"metrics": list(metrics), "compared": list(compared), "rows": rows,
                        "filters": filters, "best_filter": best, "comparisons": comps}
        if target == "speckle-free" and "psnr" in best:
            out[lv.slug]["target_check"] = _target_check(runs, models, best["psnr"])
    _holm(out)
    return out


def _target_check(runs, models, best_psnr: str) -> dict:
    """The despeckling target per network: >= 1 dB PSNR over the best (validation) filter with
    the interval excluding 0, and gCNR and FOM at least that filter's (mean difference >= 0)."""
    out = {}
    for m in models:
        a = [r["nets"][m]["scores"] for r in runs]
        b = [r["filters"][best_psnr]["scores"] for r in runs]
        c = {metric: _compare(a, b, metric, best_psnr) for metric in ("psnr", "gcnr", "fom")}
        met = (c["psnr"] is not None and c["psnr"]["mean"] >= TARGET_GAIN_DB and c["psnr"]["low"] > 0
               and all(c[x] is not None and c[x]["mean"] >= 0 for x in ("gcnr", "fom")))
        out[m] = {**c, "met": bool(met)}
    return out


def _holm(summary: dict) -> None:
    """Holm-adjust every comparison of the table together (in place)."""
    found = [c for lv in summary.values() for per in lv["comparisons"].values()
             for c in per.values() if c is not None]
    for c, p in zip(found, holm([c["p"] for c in found]) if found else []):
        c["p_holm"] = p
        c["significant"] = p < ALPHA
        c["family"] = len(found)


def _clean_json(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _clean_json(x.item())
    if isinstance(x, np.ndarray):
        return _clean_json(x.tolist())
    if isinstance(x, torch.Tensor):
        return _clean_json(x.tolist())
    return x


def _per_image(levels, per_seed) -> dict:
    """{level: {method: {metric: [[image scores of seed 0], [seed 1], ...]}}}."""
    out = {}
    for lv in levels:
        runs = [r["levels"][lv.slug] for r in per_seed]
        methods = {"noisy": [r["noisy"] for r in runs]}
        methods.update({f: [r["filters"][f]["scores"] for r in runs] for f in runs[0]["filters"]})
        methods.update({m: [r["nets"][m]["scores"] for r in runs] for m in runs[0]["nets"]})
        out[lv.slug] = {name: {metric: [_arr(s[metric]).tolist() for s in scores]
                               for metric in scores[0]} for name, scores in methods.items()}
    return out


def _csv(levels, summary) -> str:
    rows = []
    for lv in levels:
        s = summary[lv.slug]
        for key, r in s["rows"].items():
            row = {"distribution": lv.distribution, "level": lv.label, "factor": lv.factor,
                   "sigma_mult": lv.sigma_mult, "method": r["name"], "kind": r["kind"],
                   "seeds": len(next(iter(r["per_seed"].values()))),
                   "seconds_per_image": r.get("seconds_per_image")}
            for m in s["metrics"]:
                row[f"{m}_mean"], row[f"{m}_std"] = r["mean"][m], r["std"][m]
            if key in s["filters"]:
                f = s["filters"][key]
                row.update(domain=";".join(f["domain"]), params=json.dumps(f["params"], sort_keys=True),
                           marks=json.dumps(f["marks"], sort_keys=True))
            for metric, c in s["comparisons"].get(key, {}).items():
                if c is not None:
                    row.update({f"d{metric}_vs": FILTER_NAMES[c["filter"]], f"d{metric}_mean": c["mean"],
                                f"d{metric}_low": c["low"], f"d{metric}_high": c["high"],
                                f"d{metric}_p_holm": c["p_holm"]})
            rows.append(row)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _average_history(runs: list[dict]) -> list[dict]:
    """Validation loss per epoch, averaged over the seeds (the same epochs in each)."""
    n = min(len(r["history"]) for r in runs)
    return [{"epoch": runs[0]["history"][e]["epoch"],
             "val_loss": sum(r["history"][e]["val_loss"] for r in runs) / len(runs)} for e in range(n)]


def write_table(out: Path, name: str, *, args, levels, per_seed, settings, wall_s) -> str:
    """Summarize one table and write its files; returns the Markdown."""
    from speckle_models.reproduction.tables_md import render_markdown

    models = args.models
    summary = summarize(levels, models, per_seed, settings["target"])
    text = render_markdown(name, args=args, levels=levels, summary=summary, settings=settings,
                           wall_s=wall_s, n_seeds=len(per_seed))
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_text(out / f"{name}.csv", _csv(levels, summary))
    doc = {"table": name, "preset": args.preset, "wall_time_s": wall_s, "settings": settings,
           "levels": [{"label": lv.label, "slug": lv.slug, "distribution": lv.distribution,
                       "factor": lv.factor, "sigma_mult": lv.sigma_mult} for lv in levels],
           "statistics": STATS_NOTE, "bm3d_license": BM3D_LICENSE, "summary": summary,
           "per_image_per_seed": _per_image(levels, per_seed),
           "histories": {f"{m}-{lv.slug}-s{r['seed']}": r["levels"][lv.slug]["nets"][m]["history"]
                         for m in models for lv in levels for r in per_seed}}
    atomic_write_text(out / f"{name}.json", json.dumps(_clean_json(doc), indent=1) + "\n")
    n_seeds = len(per_seed)
    table2_curves({f"{DISPLAY_NAMES[m]} {lv.label}": _average_history(
                       [r["levels"][lv.slug]["nets"][m] for r in per_seed])
                   for m in models for lv in levels},
                  out / f"{name}_val_loss.png",
                  title=f"validation loss ({name}, preset {args.preset}, mean of {n_seeds} seed(s))")
    target_label = "clean" if settings["target"] == "clean" else "speckle-free"
    grid_rows = []
    for lv in levels:
        r = per_seed[0]["levels"][lv.slug]
        images = [(target_label, r["target_sample"]), ("noisy", r["sample"])]
        images += [(FILTER_NAMES[f], x["sample"]) for f, x in r["filters"].items()]
        images += [(DISPLAY_NAMES[m], r["nets"][m]["sample"]) for m in models]
        grid_rows.append((lv.label, images))
    method_grid(grid_rows, out / f"{name}_grid.png",
                title=f"test image 0 of seed {per_seed[0]['seed']} under every method ({name})")
    if any(s["best_filter"] for s in summary.values()):
        comparison_intervals(summary, levels, models, out / f"{name}_intervals.png",
                             title=f"network minus best filter ({name}; 95% two-level intervals)")
    return text
