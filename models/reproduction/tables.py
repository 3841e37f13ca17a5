"""speckle-reproduce's report of one noise model: summary statistics, then <table>.md, .csv,
.json, <table>_val_loss.png and <table>_grid.png, every file written atomically.

How the numbers are made (the Markdown repeats this under "How the numbers are made"):
- Networks, all test images: for each seed the mean PSNR (SSIM) over the test images; the table
  gives the mean ± sample standard deviation (n - 1) of those per-seed means over the seeds
  (no ± with one seed). Train and validation loss: final epoch, mean over seeds. Run time: one
  training (train + validation epochs), mean over seeds. Inference: seconds per test image of
  predict() (batches of 64, after one warm-up batch), mean over seeds.
- Filters: tuned on 8 validation images (fewer if the validation set is smaller; best mean
  PSNR over each grid), run on the first k
  test images (--baseline-count); run time per image of that run (tuning not included).
- Paired comparison, on those k images: the best filter is the one with the highest mean
  PSNR there. For each image i, d_i = (the network's PSNR on image i, averaged over its seeds)
  - (the best filter's PSNR on image i); the table gives mean d and a 95% percentile bootstrap
  interval over the k images (stats.bootstrap_mean_ci: 2000 resamples, numpy generator seeded
  0), marked * when it excludes 0. SSIM: the same against the same filter. Averaging the seeds
  first makes the interval one over test images for the recipe's average network; seed-to-seed
  spread is the ± of the network rows, not part of the interval.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from speckle_models.atomic_write import atomic_write_text

from speckle_models import DISPLAY_NAMES
from speckle_models.reproduction.baselines import DISPLAY_NAMES as FILTER_NAMES
from speckle_models.plots import method_grid, table2_curves
from speckle_models.reproduction.stats import BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, bootstrap_mean_ci, excludes_zero, mean_std

# The paper's Table 2, copied from the seed (train loss, validation loss, PSNR, SSIM, run time).
PAPER_TABLE2 = {
    ("di-conv-ae", 1): (0.0053, 0.0001, 24.5382, 0.999927, "10:36"),
    ("di-conv-ae", 5): (0.0102, 0.0003, 22.1032, 0.999883, "10:35"),
    ("di-conv-ae", 10): (0.0164, 0.0005, 20.1033, 0.999797, "10:35"),
    ("d-unet", 1): (0.0042, 0.0002, 24.9299, 0.999944, "3:38"),
    ("d-unet", 5): (0.0090, 0.0003, 21.8953, 0.999889, "3:38"),
    ("d-unet", 10): (0.0157, 0.0004, 20.5506, 0.999884, "3:38"),
    ("br-unet", 1): (0.0043, 0.0001, 25.0124, 0.999944, "13:13"),
    ("br-unet", 5): (0.0102, 0.0003, 21.0654, 0.999874, "13:13"),
    ("br-unet", 10): (0.0160, 0.0005, 19.2527, 0.999797, "13:14"),
}
STATS_NOTE = __doc__.split("(the Markdown repeats this under \"How the numbers are made\"):\n")[1]


def _mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def settings_of(args, config, data, seeds, noise, levels, k, device, tune_images) -> dict:
    if noise == "gaussian":
        model = (f"y = x (1 + f * {config.sigma_mult:g} * n1) + {config.sigma_add:g} n2, n1 Gaussian, "
                 f"f = {', '.join(lv.label[1:] for lv in levels)}")
    else:
        model = (f"y = x (1 + sigma * n1) + {config.sigma_add:g} n2, n1 standardized Rayleigh "
                 f"(distribution rayleigh, factor 1, sigma_mult = sigma), "
                 f"sigma = {', '.join(f'{lv.sigma_mult:g}' for lv in levels)}")
    return {"data": config.data, "target": config.target,
            "image size": f"{config.image_size}x{config.image_size}",
            "train/val/test images": f"{data.train.shape[0]}/{data.val.shape[0]}/{data.test.shape[0]}",
            "epochs": config.epochs, "batch": config.batch_size, "width": config.width,
            "seeds": ", ".join(map(str, seeds)), "noise": model,
            "filters": f"tuned on {tune_images} validation images, run on the first {k} test images",
            "device": str(device), "CPU threads": config.threads or torch.get_num_threads()}


def _average_history(runs: list[dict]) -> list[dict]:
    """Validation loss per epoch, averaged over the seeds (the same epochs in each)."""
    n = min(len(r["history"]) for r in runs)
    return [{"epoch": runs[0]["history"][e]["epoch"],
             "val_loss": sum(r["history"][e]["val_loss"] for r in runs) / len(runs)} for e in range(n)]


def _comparison(net_img: torch.Tensor, best_img: torch.Tensor):
    d = (net_img - best_img).numpy()
    if not (d == d).all() or not abs(d).max() < math.inf:   # an image scored +inf (no noise)
        return None
    return bootstrap_mean_ci(d)


def summarize(levels, models, nets, filters, noisy, k) -> dict:
    """The table's numbers: per level the noisy input, each filter, each network and the
    paired comparison (module docstring)."""
    out = {}
    for level in levels:
        s = level.slug
        fl = filters[s]
        n_all = noisy[s]["all"]
        row = {"noisy": {"n_all": len(n_all["psnr"]), "psnr_all": n_all["psnr"].mean().item(),
                         "ssim_all": n_all["ssim"].mean().item(),
                         "psnr": n_all["psnr"][:k].mean().item(), "ssim": n_all["ssim"][:k].mean().item()},
               "filters": {name: {"psnr": r["psnr"].mean().item(), "ssim": r["ssim"].mean().item(),
                                  "params": r["params"], "seconds_per_image": r["seconds_per_image"],
                                  "tune_time_s": r["tune_time_s"], "device": r["device"]}
                           for name, r in fl.items()},
               "best_filter": max(fl, key=lambda n: fl[n]["psnr"].mean().item()) if fl else None,
               "networks": {}}
        for m in models:
            runs = nets[(m, s)]
            psnr_m, psnr_s = mean_std([r["psnr"].mean().item() for r in runs])
            ssim_m, ssim_s = mean_std([r["ssim"].mean().item() for r in runs])
            net_psnr = torch.stack([r["psnr"][:k] for r in runs]).mean(0)
            net_ssim = torch.stack([r["ssim"][:k] for r in runs]).mean(0)
            entry = {"seeds": [r["seed"] for r in runs], "psnr_mean": psnr_m, "psnr_std": psnr_s,
                     "ssim_mean": ssim_m, "ssim_std": ssim_s,
                     "ssim_range255": sum(r["ssim_range255"] for r in runs) / len(runs),
                     "train_loss": sum(r["train_loss"] for r in runs) / len(runs),
                     "val_loss": sum(r["val_loss"] for r in runs) / len(runs),
                     "test_loss": sum(r["loss"] for r in runs) / len(runs),
                     "run_time_s": sum(r["run_time_s"] for r in runs) / len(runs),
                     "seconds_per_image": sum(r["seconds_per_image"] for r in runs) / len(runs),
                     "psnr": net_psnr.mean().item(), "ssim": net_ssim.mean().item(),
                     "per_seed": [{"seed": r["seed"], "psnr": r["psnr"].mean().item(),
                                   "ssim": r["ssim"].mean().item(), "train_loss": r["train_loss"],
                                   "val_loss": r["val_loss"], "run_time_s": r["run_time_s"],
                                   "seconds_per_image": r["seconds_per_image"]} for r in runs],
                     "vs_best": None}
            best = row["best_filter"]
            if best is not None:
                entry["vs_best"] = {"filter": best,
                                    "psnr": _comparison(net_psnr, fl[best]["psnr"]),
                                    "ssim": _comparison(net_ssim, fl[best]["ssim"])}
            row["networks"][m] = entry
        out[s] = row
    return out


def _pm(mean: float, std, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _ci(ci, digits: int, unit: str = "") -> str:
    if ci is None:
        return "n/a"
    mark = " *" if excludes_zero(ci) else ""
    return (f"{ci['mean']:+.{digits}f}{unit} [{ci['low']:+.{digits}f}, {ci['high']:+.{digits}f}]{mark}")


def render_markdown(name, *, args, levels, summary, k, settings, wall_s) -> str:
    models = args.models
    noise = levels[0].distribution
    target = settings["target"]
    cols = [(m, lv) for m in models for lv in levels]
    head = "| | " + " | ".join(f"{DISPLAY_NAMES[m]} {lv.label}" for m, lv in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"

    def row(label, values):
        return f"| {label} | " + " | ".join(values) + " |"

    def net(m, lv):
        return summary[lv.slug]["networks"][m]

    n_seeds = len(net(*cols[0])["seeds"])
    what = "Table 2 reproduction" if target == "clean" else "Despeckling (target: the speckle-free map)"
    lines = [f"# {what}, {noise} noise (preset {args.preset})", "",
             "Settings: " + "; ".join(f"{k_} {v}" for k_, v in settings.items()) + ".",
             f"Wall time of this table (trainings, evaluation, filters): {_mmss(wall_s)}.", "",
             f"## Networks on every test image (mean ± std over {n_seeds} seed{'s' * (n_seeds > 1)})",
             "", head, sep,
             row("Train loss", [f"{net(m, lv)['train_loss']:.4f}" for m, lv in cols]),
             row("Validation loss", [f"{net(m, lv)['val_loss']:.4f}" for m, lv in cols]),
             row("PSNR (dB)", [_pm(net(m, lv)["psnr_mean"], net(m, lv)["psnr_std"], 2) for m, lv in cols]),
             row("SSIM", [_pm(net(m, lv)["ssim_mean"], net(m, lv)["ssim_std"], 4) for m, lv in cols])]
    if target == "clean":
        lines.append(row("SSIM, data_range 255 on [0, 1] images",
                         [f"{net(m, lv)['ssim_range255']:.6f}" for m, lv in cols]))
    lines += [row("Run time of one training (train + val)", [_mmss(net(m, lv)["run_time_s"]) for m, lv in cols]),
              row("Inference per image", [_ms(net(m, lv)["seconds_per_image"]) for m, lv in cols])]
    paper_cols = [(m, lv.factor) for m, lv in cols
                  if (m, lv.factor) in PAPER_TABLE2 and noise == "gaussian" and target == "clean"]
    if paper_cols:
        p = [PAPER_TABLE2[c] for c in paper_cols]
        lines += ["", "## The paper's Table 2 (L4 GPU, 128x128, 10 epochs, one run each)", "",
                  "| | " + " | ".join(f"{DISPLAY_NAMES[m]} x{f:g}" for m, f in paper_cols) + " |",
                  "|---" * (len(paper_cols) + 1) + "|",
                  row("Train loss", [f"{v[0]:.4f}" for v in p]),
                  row("Validation loss", [f"{v[1]:.4f}" for v in p]),
                  row("PSNR (dB)", [f"{v[2]:.4f}" for v in p]),
                  row("SSIM", [f"{v[3]:.6f}" for v in p]),
                  row("Total run time", [v[4] for v in p])]
    lv_head = " | ".join(lv.label for lv in levels)
    n_all = summary[levels[0].slug]["noisy"]["n_all"]
    lines += ["", f"## Every method on the first {k} test images (PSNR dB / SSIM, run time per image)", "",
              f"| method | {lv_head} | parameters (tuned on validation images) |",
              "|---" * (len(levels) + 2) + "|"]
    if n_all > k:
        lines.append(row(f"noisy input (all {n_all} test images)",
                         [f"{summary[lv.slug]['noisy']['psnr_all']:.2f} / {summary[lv.slug]['noisy']['ssim_all']:.4f}"
                          for lv in levels] + [""]))
    lines.append(row("noisy input", [f"{summary[lv.slug]['noisy']['psnr']:.2f} / {summary[lv.slug]['noisy']['ssim']:.4f}"
                                     for lv in levels] + [""]))
    for f in summary[levels[0].slug]["filters"]:
        cells = []
        for lv in levels:
            r = summary[lv.slug]["filters"][f]
            best = "**" if summary[lv.slug]["best_filter"] == f else ""
            cells.append(f"{best}{r['psnr']:.2f}{best} / {r['ssim']:.4f} ({_ms(r['seconds_per_image'])})")
        params = "; ".join(f"{lv.label}: " + ", ".join(f"{a}={b}" for a, b in summary[lv.slug]["filters"][f]["params"].items())
                           for lv in levels)
        lines.append(row(FILTER_NAMES[f], cells + [params]))
    for m in models:
        cells = [f"{net(m, lv)['psnr']:.2f} / {net(m, lv)['ssim']:.4f} ({_ms(net(m, lv)['seconds_per_image'])})"
                 for lv in levels]
        lines.append(row(f"{DISPLAY_NAMES[m]} (mean of {n_seeds} seed{'s' * (n_seeds > 1)})",
                         cells + [f"trained, {args.preset} preset"]))
    if summary[levels[0].slug]["best_filter"] is not None:
        best_row = row("best filter (by mean PSNR)",
                       [FILTER_NAMES[summary[lv.slug]["best_filter"]] for lv in levels])
        lines += ["", f"## Networks minus the best filter, paired over the first {k} test images",
                  "", f"Mean difference [{BOOTSTRAP_LEVEL:.0%} bootstrap interval over the images, "
                  f"{BOOTSTRAP_RESAMPLES} resamples]; * where the interval excludes 0.", "",
                  f"| | {lv_head} |", "|---" * (len(levels) + 1) + "|", best_row]
        for m in models:
            lines.append(row(f"{DISPLAY_NAMES[m]}, PSNR (dB)",
                             [_ci(net(m, lv)["vs_best"]["psnr"], 2) for lv in levels]))
        for m in models:
            lines.append(row(f"{DISPLAY_NAMES[m]}, SSIM",
                             [_ci(net(m, lv)["vs_best"]["ssim"], 4) for lv in levels]))
    lines += ["", "## How the numbers are made", ""]
    lines += [line for line in STATS_NOTE.strip().splitlines()]
    lines += ["- Losses are MSE on images normalized to [-1, 1]; PSNR/SSIM on [0, 1] (8-bit scale), "
              "predictions clamped to [-1, 1]."]
    if target == "clean":
        lines += ["", "## Notes", "",
                  "- The paper's SSIM (0.9998-0.9999 for every run) cannot go with PSNRs of 19-25 dB: "
                  "our SSIM at similar PSNRs is far lower. The row 'SSIM, data_range 255 on [0, 1] images' "
                  "shows what eq. 6 gives when its constants c1 = (0.01 L)^2, c2 = (0.03 L)^2 use L = 255 "
                  "while the images span [0, 1] (the default data_range of common PyTorch SSIM packages): "
                  "c1 and c2 then dwarf every local variance and SSIM sits near 1 whatever the image.",
                  "- The paper's validation loss is ~1/32 of its train loss at every setting, while ours "
                  "are of the same order: consistent with a validation sum of per-batch mean losses "
                  "divided by the number of *images* (batch 32) rather than of batches."]
    else:
        lines += ["", "## Notes", "",
                  "- Target: the phantom's speckle-free map. The noisy input row scores the speckled "
                  "input against the map, so it includes the physical speckle as well as the added noise."]
    return "\n".join(lines) + "\n"


def _csv(levels, models, summary, k, n_seeds) -> str:
    rows = []
    for lv in levels:
        s = summary[lv.slug]
        base = {"distribution": lv.distribution, "level": lv.label, "factor": lv.factor,
                "sigma_mult": lv.sigma_mult, "k_images": k}
        rows.append({**base, "method": "noisy input", "kind": "input", "psnr_k": s["noisy"]["psnr"],
                     "ssim_k": s["noisy"]["ssim"], "psnr_mean": s["noisy"]["psnr_all"],
                     "ssim_mean": s["noisy"]["ssim_all"]})
        for f, r in s["filters"].items():
            rows.append({**base, "method": FILTER_NAMES[f], "kind": "filter", "psnr_k": r["psnr"],
                         "ssim_k": r["ssim"], "seconds_per_image": r["seconds_per_image"],
                         "params": json.dumps(r["params"], sort_keys=True),
                         "best_filter": s["best_filter"] == f})
        for m in models:
            n = s["networks"][m]
            row = {**base, "method": DISPLAY_NAMES[m], "kind": "network", "seeds": n_seeds,
                   "psnr_mean": n["psnr_mean"], "psnr_std": n["psnr_std"], "ssim_mean": n["ssim_mean"],
                   "ssim_std": n["ssim_std"], "psnr_k": n["psnr"], "ssim_k": n["ssim"],
                   "seconds_per_image": n["seconds_per_image"], "train_loss": n["train_loss"],
                   "val_loss": n["val_loss"], "run_time_s": n["run_time_s"]}
            if n["vs_best"] is not None:
                row["best_filter"] = FILTER_NAMES[n["vs_best"]["filter"]]
                for metric in ("psnr", "ssim"):
                    ci = n["vs_best"][metric]
                    if ci is not None:
                        row.update({f"d{metric}_mean": ci["mean"], f"d{metric}_low": ci["low"],
                                    f"d{metric}_high": ci["high"], f"d{metric}_excludes_0": excludes_zero(ci)})
            rows.append(row)
    fields = ["distribution", "level", "factor", "sigma_mult", "method", "kind", "seeds",
              "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "k_images", "psnr_k", "ssim_k",
              "seconds_per_image", "train_loss", "val_loss", "run_time_s", "best_filter",
              "dpsnr_mean", "dpsnr_low", "dpsnr_high", "dpsnr_excludes_0",
              "dssim_mean", "dssim_low", "dssim_high", "dssim_excludes_0", "params"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_table(out: Path, name: str, *, args, levels, nets, filters, noisy, k, settings,
                wall_s) -> str:
    """Summarize one noise model and write its five files; returns the Markdown."""
    models = args.models
    summary = summarize(levels, models, nets, filters, noisy, k)
    n_seeds = len(nets[(models[0], levels[0].slug)])
    text = render_markdown(name, args=args, levels=levels, summary=summary, k=k,
                           settings=settings, wall_s=wall_s)
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_text(out / f"{name}.csv", _csv(levels, models, summary, k, n_seeds))
    doc = {"table": name, "preset": args.preset, "wall_time_s": wall_s, "settings": settings,
           "levels": [{"label": lv.label, "slug": lv.slug, "distribution": lv.distribution,
                       "factor": lv.factor, "sigma_mult": lv.sigma_mult} for lv in levels],
           "statistics": STATS_NOTE, "summary": summary,
           "per_image_first_k": {lv.slug: {
               **{m: torch.stack([r["psnr"][:k] for r in nets[(m, lv.slug)]]).mean(0).tolist()
                  for m in models},
               **{f: r["psnr"].tolist() for f, r in filters[lv.slug].items()}} for lv in levels},
           "histories": {f"{m}-{lv.slug}-s{r['seed']}": r["history"]
                         for m in models for lv in levels for r in nets[(m, lv.slug)]}}
    atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=2) + "\n")
    table2_curves({f"{DISPLAY_NAMES[m]} {lv.label}": _average_history(nets[(m, lv.slug)])
                   for m in models for lv in levels},
                  out / f"{name}_val_loss.png",
                  title=f"validation loss ({name}, preset {args.preset}, mean of {n_seeds} seed(s))")
    target_label = "clean" if settings["target"] == "clean" else "speckle-free"
    rows = []
    for lv in levels:
        images = [(target_label, noisy[lv.slug]["target"]), ("noisy", noisy[lv.slug]["sample"])]
        images += [(FILTER_NAMES[f], r["sample"]) for f, r in filters[lv.slug].items()]
        images += [(DISPLAY_NAMES[m], nets[(m, lv.slug)][0]["sample"]) for m in models]
        rows.append((lv.label, images))
    method_grid(rows, out / f"{name}_grid.png",
                title=f"test image 0 under every method ({name}; networks: seed {nets[(models[0], levels[0].slug)][0]['seed']})")
    return text
