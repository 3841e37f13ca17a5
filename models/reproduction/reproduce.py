"""speckle-reproduce: the paper's Table 2 (3 networks x noise levels, several training seeds)
against tuned classical filters, for Gaussian and/or Rayleigh multiplicative noise.

    speckle-reproduce --preset quick --out runs/table2                    # Gaussian, 1 seed
    speckle-reproduce --preset medium --noise both --out runs/medium      # 3 seeds, two tables
    speckle-reproduce --preset quick --target speckle-free --out runs/despeckle

Noise models (--noise gaussian | rayleigh | both; each gets its own table):
  gaussian  the paper's: y = x (1 + f * 0.1 * n1) + 0.02 n2 with n1 ~ N(0, 1), factors
            f = 1, 5, 10 (--factors; --sigma-mult replaces the 0.1).
  rayleigh  Karaoglu et al.'s sigma = 0.10, 0.25, 0.50, 0.75 (--rayleigh-sigmas), mapped onto the
            same model as distribution "rayleigh", factor 1, sigma_mult = sigma: n1 is then a
            standardized Rayleigh variable (mean 0, variance 1, noise_stream.py), so sigma is the
            standard deviation of the multiplicative term, as f * 0.1 is for the Gaussian model.
  Both keep the additive 0.02 n2 (Gaussian; --sigma-add, 0 allowed).

For every noise level, network and seed (--seeds N: seeds --seed, --seed + 1, ...; the
train/validation split stays the one of --seed) one speckle-train run in
OUT/runs/<table>/<model>-<level>-s<seed>, evaluated on every test image with a fixed noise seed
(every network, seed and filter sees the same noisy images) and timed (inference seconds per
image, after one warm-up batch). The filters (baselines.py) are tuned on 8 validation images
and run on the first --baseline-count test images. tables.py turns this into
OUT/<table>.md / .csv / .json, OUT/<table>_val_loss.png and OUT/<table>_grid.png (test image 0
under every method at every level), <table> being table2_<noise> (despeckle_<noise> with
--target speckle-free). Its docstring says how the statistics are made.

Resuming (--resume): finished runs are re-used and killed ones continue (speckle-train), and so
are the test scores of a run (test_scores.pt in its folder) and each level's filter results
(OUT/runs/<table>/filters-<level>.pt), when the settings they were made with are unchanged;
only the tables and figures are made again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from speckle_models.atomic_write import atomic_file
from speckle_models.metrics.psnr_ssim import from_normalized, ssim
from speckle_kernels.noise_stream import DEFAULT_SIGMA_MULT

from speckle_models import MODEL_NAMES, NORMS, PAPER_NOISE_FACTORS
from speckle_models.reproduction import tables
from speckle_models.training.config import (PRESETS, RESUME_KEYS, TEST_NOISE_SEED, VAL_NOISE_SEED, add_common_arguments,
                     config_from_args, resolve_device)
from speckle_models.training.evaluate import check_target, eval_pair, load_data, per_image_scores, predict
from speckle_models.training.loop import train

NOISE_MODELS = ("gaussian", "rayleigh")
RAYLEIGH_SIGMAS = (0.10, 0.25, 0.50, 0.75)
BASELINE_TUNE_IMAGES = 8
# Per preset: training seeds per setting and test images the filters run on (the paired
# comparison uses those). quick keeps one seed so that the README's main job stays minutes long.
REPRODUCE_PRESETS = {"quick": dict(seeds=1, baseline_count=64),
                     "medium": dict(seeds=3, baseline_count=128),
                     "paper": dict(seeds=3, baseline_count=256)}
SCORES_NAME = "test_scores.pt"


@dataclass(frozen=True)
class Level:
    """One noise level of a table: the TrainConfig fields it sets, and its names."""
    distribution: str
    factor: float
    sigma_mult: float
    label: str                    # in tables: "x5", "σ=0.25"
    slug: str                     # in file names: "x5", "sigma0.25"


def noise_levels(noise: str, args) -> list[Level]:
    if noise == "gaussian":
        sigma = DEFAULT_SIGMA_MULT if args.sigma_mult is None else args.sigma_mult
        return [Level("gaussian", float(f), sigma, f"x{f:g}", f"x{f:g}") for f in args.factors]
    return [Level("rayleigh", 1.0, float(s), f"σ={s:g}", f"sigma{s:g}") for s in args.rayleigh_sigmas]


def tune_images(data) -> int:
    return min(BASELINE_TUNE_IMAGES, data.val.shape[0])


def table_name(noise: str, target: str) -> str:
    return f"{'table2' if target == 'clean' else 'despeckle'}_{noise}"


def level_config(args, model: str, level: Level, seed: int, out):
    return config_from_args(args, model=model, noise_factor=level.factor, out=str(out),
                            distribution=level.distribution, sigma_mult=level.sigma_mult,
                            seed=seed, norm=args.norm if model == "br-unet" else None)


def _cached(path: Path, key: str, resume: bool):
    """The dict saved at `path` when resuming and it was made with `key`; else None."""
    if not resume or not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a foreign or damaged file is made again
        return None
    return doc if isinstance(doc, dict) and doc.get("key") == key else None


def _store(path: Path, doc: dict) -> None:
    with atomic_file(path) as f:
        torch.save(doc, f)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_run(model, noisy: torch.Tensor, target: torch.Tensor, args) -> dict:
    """Per-image test scores of a trained network, its loss, and its inference time per image."""
    device = noisy.device
    kw = dict(amp=device.type == "cuda" and not args.no_amp, channels_last=device.type == "cuda")
    predict(model, noisy[:64], **kw)        # one batch of predict's 64 first: warm-up (cudnn
                                            # benchmark, allocator) is not timed
    _sync(device)
    t0 = time.perf_counter()
    pred = predict(model, noisy, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    p01, t01 = from_normalized(pred), from_normalized(target.float())
    return {**per_image_scores(p01, t01),
            # the SSIM a 255 data range gives on [0, 1] images: the likely paper setting
            "ssim_range255": ssim(p01, t01, data_range=255).mean().item(),
            "loss": F.mse_loss(pred, target.float()).item(),
            "seconds_per_image": seconds / len(pred), "sample": p01[0].cpu()}


def run_networks(args, data, runs: Path, levels, seeds, test_sets, device) -> dict:
    """{(model, level slug): [one dict per seed: final losses, history, test scores]}."""
    nets = {}
    for level in levels:
        noisy, target = (t.to(device) for t in test_sets[level.slug])
        for name in args.models:
            per_seed = []
            for seed in seeds:
                run_dir = runs / f"{name}-{level.slug}-s{seed}"
                result = train(level_config(args, name, level, seed, run_dir), data=data,
                               resume=args.resume, overwrite=args.overwrite)
                key = json.dumps({**{k: getattr(result.config, k) for k in RESUME_KEYS},
                                  "epochs_done": len(result.history), "n_test": len(noisy),
                                  "noise_seed": TEST_NOISE_SEED}, sort_keys=True)
                scores = _cached(run_dir / SCORES_NAME, key, args.resume)
                if scores is None:
                    scores = {"key": key, **evaluate_run(result.model, noisy, target, args)}
                    _store(run_dir / SCORES_NAME, scores)
                last = result.history[-1]
                per_seed.append({**scores, "seed": seed, "train_loss": last["train_loss"],
                                 "val_loss": last["val_loss"], "run_time_s": result.total_time_s,
                                 "history": result.history})
            nets[(name, level.slug)] = per_seed
    return nets


def run_filters(args, data, runs: Path, level: Level, config, test_noisy01, test_target01,
                k: int, device) -> dict:
    """{filter: params, per-image scores on the first k test images, times, sample image}."""
    from speckle_models.reproduction.baselines import available_filters, run_baselines

    if args.no_baselines:
        return {}
    names = available_filters()
    key = json.dumps({"level": [level.distribution, level.factor, level.sigma_mult],
                      "sigma_add": config.sigma_add, "target": config.target, "data": config.data,
                      "image_size": config.image_size, "count": config.count,
                      "test_count": config.test_count, "split_seed": args.seed, "k": k,
                      "tune_images": tune_images(data), "filters": list(names)}, sort_keys=True)
    path = runs / f"filters-{level.slug}.pt"
    cached = _cached(path, key, args.resume)
    if cached is not None:
        return cached["filters"]
    val_noisy, val_target = eval_pair(data, "val", config, VAL_NOISE_SEED, torch.device("cpu"),
                                      limit=tune_images(data))
    out = run_baselines(from_normalized(val_noisy)[:, 0].double().numpy(),
                        from_normalized(val_target)[:, 0].double().numpy(),
                        test_noisy01[:k, 0].double().numpy(), filters=names, device=device)
    filters = {}
    for name, res in out.items():
        den = torch.from_numpy(res["denoised"])[:, None]
        filters[name] = {**per_image_scores(den, test_target01[:k].double()),
                         "params": res["params"], "time_s": res["time_s"],
                         "seconds_per_image": res["seconds_per_image"],
                         "tune_time_s": res["tune_time_s"], "n_images": res["n_images"],
                         "device": res["device"], "sample": den[0].float()}
    _store(path, {"key": key, "filters": filters})
    return filters


def run_table(args, data, out: Path, noise: str, seeds, device) -> str:
    """Train, evaluate and compare everything of one noise model; write its files."""
    t0 = time.perf_counter()
    name = table_name(noise, args.target)
    runs = out / "runs" / name
    levels = noise_levels(noise, args)
    cpu = torch.device("cpu")
    configs = {lv.slug: level_config(args, args.models[0], lv, seeds[0], runs) for lv in levels}
    test_sets = {s: eval_pair(data, "test", c, TEST_NOISE_SEED, cpu) for s, c in configs.items()}
    nets = run_networks(args, data, runs, levels, seeds, test_sets, device)
    k = min(args.baseline_count, data.test.shape[0])
    filters, noisy = {}, {}
    for level in levels:
        n01, t01 = (from_normalized(t) for t in test_sets[level.slug])
        noisy[level.slug] = {"all": per_image_scores(n01, t01), "sample": n01[0], "target": t01[0]}
        filters[level.slug] = run_filters(args, data, runs, level, configs[level.slug], n01, t01,
                                          k, device)
    probe = configs[levels[0].slug]
    settings = tables.settings_of(args, probe, data, seeds, noise, levels, k, device,
                                  tune_images(data))
    return tables.write_table(out, name, args=args, levels=levels, nets=nets, filters=filters,
                              noisy=noisy, k=k, settings=settings,
                              wall_s=time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speckle-reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--noise", choices=(*NOISE_MODELS, "both"), default="gaussian",
                   help="gaussian (the paper's factors), rayleigh (Karaoglu et al.'s sigmas) or "
                        "both, each its own table (default gaussian)")
    p.add_argument("--factors", nargs="+", type=float, default=list(PAPER_NOISE_FACTORS),
                   help="Gaussian noise factors (default 1 5 10)")
    p.add_argument("--rayleigh-sigmas", nargs="+", type=float, default=list(RAYLEIGH_SIGMAS),
                   help="Rayleigh sigmas (default 0.1 0.25 0.5 0.75)")
    p.add_argument("--seeds", type=int,
                   help="training seeds per network and level (default: quick 1, medium/paper 3)")
    p.add_argument("--norm", choices=NORMS, help="Br-U-Net's norm (default fused)")
    p.add_argument("--baseline-count", type=int,
                   help="test images the filters run on and the paired comparison uses "
                        "(default: quick 64, medium 128, paper 256)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="re-use or continue the runs, test scores and filter results in OUT")
    p.add_argument("--overwrite", action="store_true", help="train again over runs already in OUT/runs")
    add_common_arguments(p, distribution=False)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    for key, value in REPRODUCE_PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.baseline_count < 1 or args.seeds < 1:
        parser.error("--baseline-count and --seeds must be >= 1")
    out = Path(args.out)
    noises = NOISE_MODELS if args.noise == "both" else (args.noise,)
    seeds = [args.seed + i for i in range(args.seeds)]
    texts = []
    try:
        probe = config_from_args(args, model=args.models[0], noise_factor=args.factors[0], out=str(out))
        device = resolve_device(probe.device)
        data = load_data(probe)
        check_target(data, probe)
        for noise in noises:
            texts.append(run_table(args, data, out, noise, seeds, device))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
