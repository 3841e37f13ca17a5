"""Make docs/figures/selfsup_phantom.{md,json,png}: the self-supervised methods judged against
the truth on the classic phantom, next to the supervised network and the best tuned filter.

    python -m benchmarks.tools.selfsup_phantom [--runs runs/selfsup_phantom] [--seeds 0 1 2]
                                               [--epochs 10] [--out docs/figures/selfsup_phantom]

Run by hand (CPU, minutes per training; a finished run is reused, a killed one resumed). Every
network is Br-U-Net with its fused norm blocks, trained on the same phantom images with no
added noise (physical speckle only): "supervised" against the speckle-free maps, the
self-supervised ones on the speckled images alone (the maps are dropped before training;
speckle-train --target self-supervised). Each is scored on the test images against the maps
(PSNR, SSIM). Filters (median, TV, Lee, Kuan, Frost, SRAD) are tuned on validation images
against the maps (reproduction/baselines.py); the best one by test PSNR is the yardstick,
which favours the filters.

Intervals: two-level percentile bootstrap of the mean PSNR (resample the seeds, then the test
images, BOOTSTRAP resamples, seeded), so a difference has to hold over training seeds and
images; paired differences resample the same seeds and images on both sides (a filter has no
seed). When the despeckling table's two-level statistics land in reproduction/stats.py, this
helper gives way to them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from speckle_models.atomic_write import atomic_write_text
from speckle_models.metrics.psnr_ssim import from_normalized
from speckle_models.plots import method_grid
from speckle_models.reproduction.baselines import run_baselines
from speckle_models.training.config import TEST_NOISE_SEED, VAL_NOISE_SEED, TrainConfig
from speckle_models.training.evaluate import eval_pair, load_data, per_image_scores, predict
from speckle_models.training.loop import train
from speckle_models.training.self_supervised import measure_correlation, subsampled_forward

RUNS = {
    "supervised (speckle-free maps)": dict(target="speckle-free"),
    "self-supervised: blind-spot": dict(target="self-supervised", ss_method="blind-spot"),
    "self-supervised: neighbor2neighbor": dict(target="self-supervised", ss_method="neighbor2neighbor"),
    "supervised, transposed upsampling": dict(target="speckle-free", upsample="transpose"),
}
FILTERS = ("median", "tv", "lee", "kuan", "frost", "srad")
# Wider grids than speckle-reproduce's (reproduction/baselines.py GRIDS, sized for added noise):
# the physical speckle here wants more smoothing, and a grid's edge must not decide the yardstick
# (in a first run TV, SRAD, Lee, Kuan and Frost all picked an edge of the default grids)
DESPECKLE_GRIDS = {
    "median": {"size": (3, 5, 7, 9, 11)},
    "tv": {"weight": (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)},
    "lee": {"window": (5, 7, 9, 11, 13), "cu2_factor": (1.0, 2.0, 4.0, 8.0)},
    "kuan": {"window": (5, 7, 9, 11, 13), "cu2_factor": (1.0, 2.0, 4.0, 8.0)},
    "frost": {"window": (5, 7, 9, 11, 13), "damping": (0.125, 0.25, 0.5, 1.0, 2.0)},
    "srad": {"iterations": (10, 20, 40, 80, 160), "q0_factor": (1.0, 2.0, 4.0, 8.0)},
}
BOOTSTRAP = 2000


def base_config(args, out: Path, seed: int, **kw) -> TrainConfig:
    kw.setdefault("upsample", args.upsample)
    return TrainConfig(model="br-unet", out=str(out), noise_factor=0.0, sigma_add=0.0, seed=seed,
                       epochs=args.epochs, batch_size=4, lr=0.002, width=args.width,
                       image_size=args.image_size, count=args.count, test_count=args.test_count,
                       threads=1, device="cpu", progress=False,
                       cache_dir=args.cache_dir, **kw).resolved()


# (fill, hidden share, correlation threshold of the footprint)
ABLATION = [("speckle", 0.08, 0.1), ("speckle", 0.15, 0.1), ("speckle", 0.3, 0.1), ("speckle", 0.45, 0.1),
            ("mean", 0.3, 0.1), ("speckle", 0.3, 0.2), ("speckle", 0.3, 0.3)]


def ablation(args, data, test_noisy, test_clean) -> None:
    """The blind spot's design choices, seed 0: the fill of hidden pixels (smooth local mean, or
    local mean + displaced speckle residual), the hidden share, and the correlation threshold
    that sizes the footprint (a higher one: a smaller blind spot that lets some correlated
    speckle through) -> OUT_ablation.md."""
    from speckle_models.training import self_supervised as S

    acf = S.speckle_autocorrelation(data.train)

    made = S.make_objective
    lines = ["# Blind-spot design choices on the classic phantom "
             f"({time.strftime('%Y-%m-%d')}, {_cpu()})", "",
             f"Command: `python -m benchmarks.tools.selfsup_phantom --ablation --epochs {args.epochs}` "
             f"(seed 0; the settings of selfsup_phantom.md otherwise)", "",
             "| fill of hidden pixels | hidden share | footprint: rho > | footprint | test PSNR (dB) | SSIM |",
             "|---|---|---|---|---|---|"]
    for texture, share, thr in ABLATION:
        corr = S.correlation_from_acf(acf, thr)
        S.make_objective = lambda method, c, t=texture, h=share, k=corr: S.BlindSpot(k, h, t)
        try:
            default = (texture, share, thr) == ("speckle", S.HIDDEN_FRACTION, S.THRESHOLD)
            name = "blind-spot-s0" if default else f"ablation-{texture}-{share}-{thr}"  # the study's run
            cfg = base_config(args, Path(args.runs) / name, 0,
                              target="self-supervised", ss_method="blind-spot")
            model = train(cfg, data=data, resume=True, plots=False).model
        finally:
            S.make_objective = made
        per = per_image_scores(from_normalized(predict(model, test_noisy)), from_normalized(test_clean))
        fill = "local mean + displaced speckle residual" if texture == "speckle" else "local mean (smooth)"
        lines.append(f"| {fill} | {share:.0%} | {thr} | {len(corr.footprint)}x{len(corr.footprint[0])} | "
                     f"{per['psnr'].mean():.2f} | {per['ssim'].mean():.4f} |")
        print(lines[-1], flush=True)
    write_sibling(args, "ablation", lines)


def write_sibling(args, kind: str, lines: list[str]) -> None:
    """docs/figures/selfsup_<kind>.md next to the study's own files."""
    out = Path(args.out)
    atomic_write_text(out.with_name(out.name.replace("phantom", kind) + ".md"), "\n".join(lines) + "\n",
                      overwrite=True)


def upsampling(args) -> None:
    """Checkerboard energy of the seed-0 supervised networks, transposed and resize, on dark
    areas of phantom frames: realistic-phantom images at 128 x 128 (sector and linear, black
    outside, anechoic cysts; the classic phantom has no dark 16 x 16 window) -> OUT_upsampling.md."""
    from speckle_models.data.realistic_phantom import generate_realistic_phantom
    from speckle_models.inference.denoise import load_denoiser
    from speckle_models.inference.tiling import denoise_frames
    from speckle_models.metrics.real_scan import judge

    images, _, draws = generate_realistic_phantom(16, image_size=128, seed=99, progress=False)
    frames = [im[0].double().numpy() / 255 for im in images]
    lines = [f"# Upsampling and checkerboard energy on phantom frames ({time.strftime('%Y-%m-%d')}, {_cpu()})", "",
             "Command: `python -m benchmarks.tools.selfsup_phantom --upsampling` (after the study: its seed-0 "
             "supervised networks, trained on the classic phantom; frames: 16 realistic-phantom images, "
             "128 x 128, seed 99)", "",
             "| network | checkerboard share of dark-window energy, output (median over frames) | input | "
             "dark windows | test PSNR on the classic phantom (3 seeds) |", "|---|---|---|---|---|"]
    study = json.loads(Path(args.out).with_suffix(".json").read_text())
    psnr = {r["method"]: r["psnr"] for r in study["rows"]}
    for name, run, row in (("transposed (ConvTranspose2d 2, stride 2)", "supervised-transpose-s0",
                            "supervised, transposed upsampling"),
                           ("resize (bilinear x2 + conv 3x3)", "supervised-s0", "supervised (speckle-free maps)")):
        model = load_denoiser(Path(args.runs) / run / "checkpoint.pt", "cpu")
        outs = denoise_frames(model, frames)
        rows = [judge(f, np.rint(o * 255) / 255) for f, o in zip(frames, outs)]
        got = [r["checker_after"] for r in rows if r["checker_after"] is not None]
        before = [r["checker_before"] for r in rows if r["checker_before"] is not None]
        lines.append(f"| {name} | {100 * np.median(got):.1f}% (max {100 * max(got):.1f}%) | "
                     f"{100 * np.median(before):.1f}% | {sum(r['dark_windows'] for r in rows)} | {psnr[row]:.2f} |")
        print(lines[-1], flush=True)
    write_sibling(args, "upsampling", lines)


def two_level(values: np.ndarray, rng: np.random.Generator, reps: int = BOOTSTRAP) -> tuple[float, float]:
    """95% interval of the mean of values (seeds, images): seeds then images resampled."""
    s, n = values.shape
    means = np.empty(reps)
    for r in range(reps):
        rows = values[rng.integers(0, s, s)]
        means[r] = rows[np.arange(s)[:, None], rng.integers(0, n, (s, n))].mean()
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/selfsup_phantom")
    p.add_argument("--out", default="docs/figures/selfsup_phantom")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--test-count", type=int, default=64)
    p.add_argument("--upsample", default="resize")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--only-train", action="store_true", help="train what is missing, write nothing")
    p.add_argument("--ablation", action="store_true", help="the blind spot's fill and hidden share instead")
    p.add_argument("--upsampling", action="store_true", help="checkerboard energy of the two upsamplings")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.upsampling:
        return upsampling(args)
    runs = Path(args.runs)
    probe = base_config(args, runs / "probe", args.seeds[0], target="speckle-free")
    data = load_data(probe)
    test_noisy, test_clean = eval_pair(data, "test", probe, TEST_NOISE_SEED, torch.device("cpu"))
    corr = measure_correlation(data.train)
    if args.ablation:
        return ablation(args, data, test_noisy, test_clean)

    scores, images, timing, per_seed = {}, {}, {}, {}
    for name, kw in RUNS.items():
        psnr, ssim = [], []
        pd_psnr = []
        for seed in args.seeds:
            tag = kw.get("ss_method", "supervised") + ("-transpose" if kw.get("upsample") == "transpose" else "")
            cfg = base_config(args, runs / f"{tag}-s{seed}", seed, **kw)
            t0 = time.perf_counter()
            result = train(cfg, data=data, resume=True, plots=seed == args.seeds[0])
            timing.setdefault(name, []).append(sum(h["epoch_time_s"] for h in result.history))
            if args.only_train:
                continue
            pred = predict(result.model, test_noisy)
            per = per_image_scores(from_normalized(pred), from_normalized(test_clean))
            psnr.append(per["psnr"].numpy())
            ssim.append(per["ssim"].numpy())
            if seed == args.seeds[0]:
                images[name] = pred
            if kw.get("ss_method") == "neighbor2neighbor":     # (b) with its matching inference
                stride = (corr.axial + 1, corr.lateral + 1)
                with torch.no_grad():
                    result.model.eval()
                    pd = subsampled_forward(result.model, test_noisy, stride).clamp(-1, 1)
                h, w = pd.shape[-2:]
                per_pd = per_image_scores(from_normalized(pd), from_normalized(test_clean[..., :h, :w]))
                pd_psnr.append(per_pd["psnr"].numpy())
                if seed == args.seeds[0]:
                    images[name + " (polyphase inference)"] = pd
            print(f"{name} seed {seed}: {psnr[-1].mean():.2f} dB ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.only_train:
            continue
        scores[name] = {"psnr": np.stack(psnr), "ssim": np.stack(ssim)}
        if pd_psnr:
            scores[name + " (polyphase inference)"] = {"psnr": np.stack(pd_psnr), "ssim": None}
    if args.only_train:
        return

    # filters: tuned on 16 validation images against the maps
    val_noisy, val_clean = eval_pair(data, "val", probe, VAL_NOISE_SEED, torch.device("cpu"), limit=16)
    unit = lambda t: from_normalized(t.float())[:, 0].double().numpy()  # noqa: E731
    from speckle_models.reproduction import baselines

    baselines.GRIDS.update(DESPECKLE_GRIDS)          # this process only
    filt = run_baselines(unit(val_noisy), unit(val_clean), unit(test_noisy), filters=FILTERS)
    clean01 = torch.from_numpy(unit(test_clean))
    filter_psnr = {f: per_image_scores(torch.from_numpy(r["denoised"]), clean01)["psnr"].numpy()
                   for f, r in filt.items()}
    best = max(filter_psnr, key=lambda f: filter_psnr[f].mean())
    noisy_psnr = per_image_scores(from_normalized(test_noisy), from_normalized(test_clean))["psnr"].numpy()
    write_outputs(args, scores, filt, filter_psnr, best, noisy_psnr, corr, timing, images,
                  test_noisy, test_clean)


def write_outputs(args, scores, filt, filter_psnr, best, noisy_psnr, corr, timing, images,
                  test_noisy, test_clean) -> None:
    rng = np.random.default_rng(0)
    sup = scores["supervised (speckle-free maps)"]["psnr"]
    best_row = filter_psnr[best][None]
    rows = []
    for name, sc in scores.items():
        v = sc["psnr"]
        n = min(v.shape[1], sup.shape[1])
        row = {"method": name, "psnr": float(v.mean()), "psnr_ci": two_level(v, rng),
               "psnr_per_seed": v.mean(1).tolist(),
               "ssim": None if sc["ssim"] is None else float(sc["ssim"].mean()),
               "minus_supervised": float((v - sup).mean()), "minus_supervised_ci": two_level(v - sup, rng),
               "minus_best_filter": float((v - best_row).mean()),
               "minus_best_filter_ci": two_level(v - best_row, rng), "images": n,
               "train_time_s": timing.get(name)}
        rows.append(row)
    for f, v in sorted(filter_psnr.items(), key=lambda kv: -kv[1].mean()):
        rows.append({"method": f"filter: {f} {filt[f]['params']}", "psnr": float(v.mean()),
                     "psnr_ci": two_level(v[None], rng), "psnr_per_seed": None, "ssim": None,
                     "minus_supervised": float((v[None] - sup).mean()),
                     "minus_supervised_ci": two_level(v[None] - sup, rng),
                     "minus_best_filter": float((v - filter_psnr[best]).mean()), "minus_best_filter_ci": None,
                     "images": len(v), "train_time_s": None})
    doc = {"date": time.strftime("%Y-%m-%d"), "device": _cpu(), "settings": vars(args),
           "speckle_correlation": corr.as_dict(), "noisy_psnr": float(noisy_psnr.mean()),
           "best_filter": best, "rows": rows, "bootstrap": {"resamples": BOOTSTRAP, "seed": 0,
                                                             "levels": "seeds, then test images"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=2) + "\n", overwrite=True)
    atomic_write_text(out.with_suffix(".md"), table(doc, args), overwrite=True)
    k = 3
    short = {"supervised (speckle-free maps)": "supervised", "self-supervised: blind-spot": "blind-spot",
             "self-supervised: neighbor2neighbor": "N2N",
             "self-supervised: neighbor2neighbor (polyphase inference)": "N2N polyphase",
             "supervised, transposed upsampling": "sup. transp."}
    grid = [(f"test {i}", [("input", from_normalized(test_noisy[i])), ("truth", from_normalized(test_clean[i])),
                          *[(short.get(n, n), from_normalized(images[n][i])) for n in images],
                          (f"{best} (filter)", torch.from_numpy(filt[best]["denoised"][i]))])
            for i in range(k)]
    method_grid(grid, out.with_name(out.name + "_grid.png"), title="classic phantom, test images")


def _ci(ci) -> str:
    return "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def table(doc: dict, args) -> str:
    c = doc["speckle_correlation"]
    lines = [f"# Self-supervised despeckling on the classic phantom ({doc['date']}, {doc['device']})", "",
             "Command: `python -m benchmarks.tools.selfsup_phantom "
             f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs} --width {args.width} "
             f"--image-size {args.image_size} --count {args.count} --test-count {args.test_count}`", "",
             f"Br-U-Net (fused norm blocks, {args.upsample} upsampling), width {args.width}, "
             f"{args.image_size}x{args.image_size}, {args.count} phantom images (80/20 train/validation), "
             f"{args.epochs} epochs, batch 4, Adamax 0.002; no added noise: physical speckle only. "
             f"Scored against the speckle-free maps on {args.test_count} test images; input PSNR "
             f"{doc['noisy_psnr']:.2f} dB.", "",
             f"Measured speckle correlation (training images): decorrelation length {c['axial']} px axially, "
             f"{c['lateral']} px laterally (FWHM {c['axial_fwhm']:.2f} x {c['lateral_fwhm']:.2f} px); "
             f"blind footprint `{' / '.join(c['footprint'])}`.", "",
             "| method | PSNR (dB) [95% CI] | SSIM | minus supervised [CI] | minus best filter [CI] | per seed |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        seeds = "" if r["psnr_per_seed"] is None else ", ".join(f"{v:.2f}" for v in r["psnr_per_seed"])
        ssim = "" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['method']} | {r['psnr']:.2f}{_ci(r['psnr_ci'])} | {ssim} | "
                     f"{r['minus_supervised']:+.2f}{_ci(r['minus_supervised_ci'])} | "
                     f"{r['minus_best_filter']:+.2f}{_ci(r['minus_best_filter_ci'])} | {seeds} |")
    lines += ["", "Intervals: two-level percentile bootstrap (seeds, then test images; "
              f"{BOOTSTRAP} resamples); a filter has no seed. Best filter: {doc['best_filter']} "
              "(tuned on 16 validation images against the maps, picked by test PSNR).", ""]
    return "\n".join(lines)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
