"""The Markdown of one speckle-reproduce table (tables.py makes the numbers).

Sections: settings; per level, every method with every metric (mean ± std over seeds); the
networks minus the best filter per metric (two-level intervals, Holm); for the despeckling
table the target check; the filters' tuning (domain, parameters per seed, grid marks); the
networks' training; the paper's Table 2 (Gaussian paper protocol); how the numbers are made.
"""
from __future__ import annotations

import math

from speckle_models import DISPLAY_NAMES
from speckle_models.reproduction.baselines import BM3D_LICENSE
from speckle_models.reproduction.baselines import DISPLAY_NAMES as FILTER_NAMES
from speckle_models.reproduction.scoring import METRIC_NAMES
from speckle_models.reproduction.stats import ALPHA, BOOTSTRAP_LEVEL, TWO_LEVEL_RESAMPLES

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
DIGITS = {"psnr": 2, "ssim": 4, "gcnr": 3, "fom": 3, "beta": 3, "snr": 2, "enl": 2}
MARKS = {"edge": "†", "bound": "‡"}


def _mmss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _ms(seconds) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


FLAT = 1e6  # speckle SNR / ENL of a window that is flat up to rounding (the speckle-free map's)


def _pm(mean: float, std, digits: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    if abs(mean) >= FLAT:
        return "flat (> 10⁶)"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _ci(c, digits: int) -> str:
    if c is None:
        return "n/a"
    star = " *" if c.get("significant") else ""
    return (f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}] "
            f"p={c.get('p_holm', c['p']):.2g}{star}")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _params(p: dict, marks: dict) -> str:
    return ", ".join(f"{k}={v:g}{MARKS.get(marks.get(k), '')}" if isinstance(v, (int, float))
                     else f"{k}={v}" for k, v in p.items())


def _methods(s: dict, despeckle: bool) -> list[str]:
    metrics = s["metrics"]
    head = ["method"] + (["domain"] if despeckle else []) + [METRIC_NAMES[m] for m in metrics] + ["time / image"]
    lines = [_row(head), "|---" * len(head) + "|"]
    for key, r in s["rows"].items():
        f = s["filters"].get(key)
        cells = [r["name"] + (" (mean of seeds)" if r["kind"] == "network" else "")]
        if despeckle:
            if f is None:
                cells.append("")
            else:
                doms = sorted(set(f["domain"]))
                cells.append("/".join(d + ("" if d == f["design_domain"] else " (not design)") for d in doms))
        for m in metrics:
            best = f is not None and s["best_filter"].get(m) == key
            text = _pm(r["mean"][m], r["std"][m], DIGITS[m])
            cells.append(f"**{text}**" if best else text)
        cells.append(_ms(r.get("seconds_per_image")))
        lines.append(_row(cells))
    return lines


def _comparisons(s: dict, models, n_seeds: int, family: int) -> list[str]:
    compared = s["compared"]
    compared = [m for m in compared if m in s["best_filter"]]
    lines = [_row([""] + [METRIC_NAMES[m] for m in compared]), "|---" * (len(compared) + 1) + "|",
             _row(["best filter (on validation)"] + [FILTER_NAMES[s["best_filter"][m]] for m in compared])]
    for m in models:
        lines.append(_row([DISPLAY_NAMES[m]] + [_ci(s["comparisons"][m].get(x), DIGITS[x]) for x in compared]))
    return lines


def _target(s: dict, models) -> list[str]:
    best = FILTER_NAMES[s["best_filter"]["psnr"]]
    lines = [f"Against the best filter by validation PSNR ({best}): Δ PSNR ≥ 1 dB with its "
             "interval above 0, and Δ gCNR and Δ FOM ≥ 0 (mean differences).", "",
             _row(["network", "Δ PSNR (dB)", "Δ gCNR", "Δ Pratt's FOM", "met"]), "|---" * 5 + "|"]
    for m in models:
        t = s["target_check"][m]
        lines.append(_row([DISPLAY_NAMES[m]] + [_ci(t[x], DIGITS[x]).replace(" *", "")
                                                for x in ("psnr", "gcnr", "fom")]
                          + ["**yes**" if t["met"] else "no"]))
    met = [DISPLAY_NAMES[m] for m in models if s["target_check"][m]["met"]]
    lines += ["", "Target met by: " + (", ".join(met) if met else "no network") + "."]
    return lines


def _tuning(s: dict, despeckle: bool) -> list[str]:
    head = ["filter"] + (["design domain", "val PSNR display / intensity"] if despeckle else []) \
        + ["domain and parameters per seed (tuned on validation)"]
    lines = [_row(head), "|---" * len(head) + "|"]
    for f, info in s["filters"].items():
        per = "; ".join(f"s{i}: " + (f"{d}, " if despeckle else "") + _params(p, mk)
                        for i, (d, p, mk) in enumerate(zip(info["domain"], info["params"], info["marks"])))
        cells = [FILTER_NAMES[f]]
        if despeckle:
            v = info["val_psnr_by_domain"]
            cells += [info["design_domain"], " / ".join(f"{v[d]:.2f}" if d in v else "—"
                                                        for d in ("display", "intensity"))]
        lines.append(_row(cells + [per]))
    return lines


def _training(levels, summary, models) -> list[str]:
    cols = [(m, lv) for m in models for lv in levels]
    lines = [_row([""] + [f"{DISPLAY_NAMES[m]} {lv.label}" for m, lv in cols]), "|---" * (len(cols) + 1) + "|"]
    for label, key, fmt in (("Train loss", "train_loss", "{:.4f}"), ("Validation loss", "val_loss", "{:.4f}"),
                            ("Run time of one training", "run_time_s", None),
                            ("Inference per image", "seconds_per_image", None)):
        cells = []
        for m, lv in cols:
            v = summary[lv.slug]["rows"][m][key]
            cells.append(fmt.format(v) if fmt else (_mmss(v) if key == "run_time_s" else _ms(v)))
        lines.append(_row([label] + cells))
    return lines


def _paper(levels, models, summary) -> list[str]:
    cols = [(m, lv) for m in models for lv in levels if (m, lv.factor) in PAPER_TABLE2]
    if not cols:
        return []
    p = [PAPER_TABLE2[(m, lv.factor)] for m, lv in cols]
    ours = [summary[lv.slug]["rows"][m] for m, lv in cols]
    return ["", "## The paper's Table 2 (L4 GPU, 128x128, 10 epochs, one run each) beside ours", "",
            _row([""] + [f"{DISPLAY_NAMES[m]} x{lv.factor:g}" for m, lv in cols]),
            "|---" * (len(cols) + 1) + "|",
            _row(["paper: PSNR (dB)"] + [f"{v[2]:.2f}" for v in p]),
            _row(["paper: SSIM"] + [f"{v[3]:.6f}" for v in p]),
            _row(["ours: PSNR (dB)"] + [f"{o['mean']['psnr']:.2f}" for o in ours]),
            _row(["ours: SSIM, data_range 255 on [0, 1] images"] + [f"{o['ssim_range255']:.6f}" for o in ours]),
            _row(["paper: total run time"] + [v[4] for v in p])]


def render_markdown(name, *, args, levels, summary, settings, wall_s, n_seeds) -> str:
    from speckle_models.reproduction.tables import STATS_NOTE

    models = args.models
    despeckle = settings["target"] == "speckle-free"
    first = summary[levels[0].slug]
    family = next((c["family"] for s in summary.values() for per in s["comparisons"].values()
                   for c in per.values() if c is not None), 0)
    what = ("Despeckling: the B-mode image against its speckle-free map" if despeckle
            else "The paper's protocol on the phantom: added noise removed, the speckled image as target")
    lines = [f"# {what} ({levels[0].distribution} noise, preset {args.preset})", "",
             "Settings: " + "; ".join(f"{k} {v}" for k, v in settings.items()) + ".",
             f"Wall time of this invocation (what it did not find done in OUT/runs: data, "
             f"trainings, evaluation, filters): {_mmss(wall_s)}."]
    if "bm3d" in first["filters"]:
        lines.append(f"BM3D: the `bm3d` package, {BM3D_LICENSE}.")
    else:
        lines.append("BM3D: not run in this table (`--filters` left it out or the `bm3d` extra is absent).")
    for lv in levels:
        s = summary[lv.slug]
        lines += ["", f"## {lv.label}: every method on {settings['scored']} "
                  f"(mean ± std over {n_seeds} seed{'s' * (n_seeds > 1)})", "",
                  "Bold: the best filter of that metric on validation images."]
        lines += [""] + _methods(s, despeckle)
        if s["best_filter"]:
            lines += ["", f"### {lv.label}: networks minus the best filter of each metric", "",
                      f"Mean difference [{BOOTSTRAP_LEVEL:.0%} two-level bootstrap interval: seeds, then "
                      f"images within each seed; {TWO_LEVEL_RESAMPLES} resamples] and Holm-adjusted p over "
                      f"the table's {family} comparisons; * where p < {ALPHA:g}.", ""]
            lines += _comparisons(s, models, n_seeds, family)
        if despeckle and "target_check" in s:
            lines += ["", f"### {lv.label}: the target", ""] + _target(s, models)
        if s["filters"]:
            lines += ["", f"### {lv.label}: the filters' tuning", "",
                      f"† on the edge of its grid after the growth rounds ran out; ‡ on the "
                      f"parameter's domain bound (e.g. the smallest window)."
                      + (" Val PSNR: mean over seeds in each domain; the table uses the better "
                         "(per seed)." if despeckle else ""), ""]
            lines += _tuning(s, despeckle)
    lines += ["", "## Networks: training (mean over seeds)", ""] + _training(levels, summary, models)
    if not despeckle and levels[0].distribution == "gaussian":
        lines += _paper(levels, models, summary)
    lines += ["", "## How the numbers are made", ""] + STATS_NOTE.strip().splitlines()
    lines += ["- Losses are MSE on images normalized to [-1, 1]; metrics on [0, 1] (8-bit scale), "
              "predictions clamped to [-1, 1]."]
    if despeckle:
        from speckle_models.reproduction.scoring import __doc__ as scoring_doc
        lines += ["- Metrics (scoring.py):", "", "```", scoring_doc.strip(), "```"]
    else:
        lines += ["- The paper's SSIM (0.9998-0.9999 for every run) cannot go with PSNRs of 19-25 dB; "
                  "the row 'SSIM, data_range 255 on [0, 1] images' shows what eq. 6 gives when its "
                  "constants use L = 255 while the images span [0, 1]: c1 and c2 then dwarf every local "
                  "variance and SSIM sits near 1 whatever the image."]
    return "\n".join(lines) + "\n"
