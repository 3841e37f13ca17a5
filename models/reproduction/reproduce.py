"""speckle-reproduce: the three networks against tuned classical filters, over seeds that
each redraw the whole experiment; two kinds of table.

    speckle-reproduce --preset medium --target speckle-free --factors 0 --sigma-add 0 --out runs/despeckle
    speckle-reproduce --preset medium --noise both --out runs/medium    # the paper's protocol
    speckle-reproduce --preset quick --out runs/table2

--target speckle-free (the despeckling table, despeckle_<noise>): the input is the phantom's
B-mode image (with its physical speckle; --factors 0 --sigma-add 0 adds nothing else), the
target its speckle-free map. Filters are tuned on display values and on intensities
(baselines.py) and scored on structure too (scoring.py: gCNR, Pratt's FOM, beta, speckle
SNR, ENL). --target clean (table2_<noise>, the paper's protocol): the target is the B-mode
image itself, the input that image with added noise; PSNR and SSIM.

Noise models (--noise gaussian | rayleigh | both; each gets its own table):
  gaussian  the paper's: y = x (1 + f * 0.1 * n1) + 0.02 n2 with n1 ~ N(0, 1), factors
            f = 1, 5, 10 (--factors; --sigma-mult replaces the 0.1).
  rayleigh  y = x (1 + sigma * n1) + 0.02 n2 with n1 = (R - sqrt(pi/2)) / sqrt(2 - pi/2),
            R ~ Rayleigh(1): a zero-mean, unit-variance (standardized) Rayleigh variable, so
            sigma is the standard deviation of the multiplicative term, as f * 0.1 is for the
            Gaussian model. sigma = 0.10, 0.25, 0.50, 0.75 (--rayleigh-sigmas) are the levels
            of Karaoglu et al.'s Rayleigh experiments; their exact noise draw is not public, and
            this is not claimed to be it.
  Both keep the additive 0.02 n2 (Gaussian; --sigma-add, 0 allowed).

Seeds (--seeds N: --seed, --seed + 1, ...): each seed is a replicate of the whole experiment:
its own phantom draw (phantom seed = the seed), train/validation split, initialisation,
training noise and data order (datasets.shuffle_seed), its own filter tuning (on the first
TUNE_IMAGES validation images of its split) and its own test images (the first
--baseline-count of its test set, the same for every method). One speckle-train run per
network, level and seed in OUT/runs/<table>/<model>-<level>-s<seed>. tables.py makes
OUT/<table>.md / .csv / .json and figures; its docstring says how the statistics are made.

Resuming (--resume): finished runs are re-used and killed ones continue (speckle-train), and so
are a run's test scores (test_scores.pt) and a level's filter results per seed
(OUT/runs/<table>/filters-<level>-s<seed>.pt) made with unchanged settings; the tables are made
again. Everything a long run needs is saved as it goes, so a killed job loses one training.
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

from speckle_kernels.noise_stream import DEFAULT_SIGMA_MULT

from speckle_models import MODEL_NAMES, NORMS, PAPER_NOISE_FACTORS
from speckle_models.atomic_write import atomic_file
from speckle_models.metrics.psnr_ssim import from_normalized, ssim
from speckle_models.reproduction import tables
from speckle_models.reproduction.scoring import make_regions, score_images
from speckle_models.training.config import (PRESETS, RESUME_KEYS, TEST_NOISE_SEED, VAL_NOISE_SEED,
                                            add_common_arguments, config_from_args, resolve_device)
from speckle_models.training.evaluate import check_target, eval_pair, load_data, predict
from speckle_models.training.loop import train

NOISE_MODELS = ("gaussian", "rayleigh")
RAYLEIGH_SIGMAS = (0.10, 0.25, 0.50, 0.75)
PROTOCOL = 2              # bump when what a cached score file means changes
# Per preset: seeds per setting and test images every method is scored on.
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
        return [Level("gaussian", float(f), sigma, "speckle only" if f == 0 and args.sigma_add == 0
                      else f"x{f:g}", f"x{f:g}") for f in args.factors]
    return [Level("rayleigh", 1.0, float(s), f"σ={s:g}", f"sigma{s:g}") for s in args.rayleigh_sigmas]


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


def _tensors(scores: dict) -> dict:
    return {m: torch.as_tensor(v, dtype=torch.float64) for m, v in scores.items()}


def evaluate_run(model, noisy: torch.Tensor, target: torch.Tensor, regions, args) -> dict:
    """Per-image test scores of a trained network, its loss, and its inference time per image."""
    device = noisy.device
    kw = dict(amp=device.type == "cuda" and not args.no_amp, channels_last=device.type == "cuda")
    predict(model, noisy[:64], **kw)        # warm-up (cudnn benchmark, allocator), not timed
    _sync(device)
    t0 = time.perf_counter()
    pred = predict(model, noisy, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    p01, t01 = from_normalized(pred).cpu(), from_normalized(target.float()).cpu()
    return {"scores": _tensors(score_images(p01, t01, regions)),
            # the SSIM a 255 data range gives on [0, 1] images: the likely paper setting
            "ssim_range255": ssim(p01, t01, data_range=255).mean().item(),
            "loss": F.mse_loss(pred, target.float()).item(),
            "seconds_per_image": seconds / len(pred), "sample": p01[0]}


def _filter_key(args, level, config, seed, k, n_tune, names, domains) -> str:
    return json.dumps({"protocol": PROTOCOL, "level": [level.distribution, level.factor, level.sigma_mult],
                       "sigma_add": config.sigma_add, "target": config.target, "data": config.data,
                       "image_size": config.image_size, "count": config.count,
                       "test_count": config.test_count, "seed": seed,
                       "phantom": [config.phantom_seed, config.phantom_version], "k": k,
                       "tune_images": n_tune, "filters": list(names), "domains": list(domains)},
                      sort_keys=True)


def run_filters(args, runs: Path, level: Level, config, seed: int, sets: dict, device) -> dict:
    """{filter: params, domain, marks, per-image test scores, validation means, times, sample}
    for one level and seed."""
    from speckle_models.reproduction.baselines import available_filters, run_baselines

    if args.no_baselines:
        return {}
    names = tuple(f for f in (args.filters or available_filters()))
    domains = ("display", "intensity") if config.target == "speckle-free" else ("display",)
    (vn, vt, vreg), (tn, tt, treg) = sets["val"], sets["test"]
    key = _filter_key(args, level, config, seed, len(tn), len(vn), names, domains)
    path = runs / f"filters-{level.slug}-s{seed}.pt"
    cached = _cached(path, key, args.resume)
    if cached is not None:
        return cached["filters"]
    out = run_baselines(vn[:, 0].double().numpy(), vt[:, 0].double().numpy(),
                        tn[:, 0].double().numpy(), filters=names, device=device, domains=domains,
                        log=lambda line: print(f"[{level.slug} seed {seed}] {line}", file=sys.stderr,
                                               flush=True))
    filters = {}
    for name, res in out.items():
        den = torch.from_numpy(res["denoised"])[:, None]
        val = score_images(torch.from_numpy(res["val_denoised"])[:, None], vt, vreg)
        filters[name] = {"scores": _tensors(score_images(den, tt, treg)),
                         "val": {m: float(torch.as_tensor(v).nanmean()) for m, v in val.items()},
                         "params": res["params"], "domain": res["domain"], "marks": res["marks"],
                         "domains": res["domains"], "seconds_per_image": res["seconds_per_image"],
                         "tune_time_s": res["tune_time_s"], "device": res["device"],
                         "sample": den[0].float()}
    _store(path, {"key": key, "filters": filters})
    return filters


def _eval_sets(data, config, k: int, n_tune: int) -> dict:
    """{"val": (noisy01, target01, regions), "test": ...} on the CPU, first n_tune / k images."""
    cpu = torch.device("cpu")
    out = {}
    for split, seed, limit in (("val", VAL_NOISE_SEED, n_tune), ("test", TEST_NOISE_SEED, k)):
        noisy, target = eval_pair(data, split, config, seed, cpu, limit=limit)
        n01, t01 = from_normalized(noisy).double(), from_normalized(target).double()
        regions = None
        if config.target == "speckle-free":
            regions = make_regions(t01, getattr(data, f"{split}_geometry")[:limit])
        out[split] = (n01, t01, regions, noisy, target)
    return out


def run_seed(args, runs: Path, levels, seed: int, device) -> dict:
    """Everything of one seed: the data, every network at every level, the filters."""
    from speckle_models.reproduction.baselines import TUNE_IMAGES

    probe = level_config(args, args.models[0], levels[0], seed, runs)
    data = load_data(probe)
    check_target(data, probe)
    k = min(args.baseline_count, data.test.shape[0])
    n_tune = min(TUNE_IMAGES, data.val.shape[0])
    result = {"seed": seed, "k": k, "n_tune": n_tune, "levels": {},
              "sizes": (data.train.shape[0], data.val.shape[0], data.test.shape[0])}
    for level in levels:
        config = level_config(args, args.models[0], level, seed, runs)
        sets = _eval_sets(data, config, k, n_tune)
        n01, t01, regions, noisy, target = sets["test"]
        row = {"noisy": _tensors(score_images(n01, t01, regions)), "sample": n01[0].float(),
               "target_sample": t01[0].float(), "nets": {}}
        if regions is not None:        # the speckle-free map's own structure: the reference row
            row["target"] = _tensors(score_images(t01, t01, regions))
        for name in args.models:
            run_dir = runs / f"{name}-{level.slug}-s{seed}"
            res = train(level_config(args, name, level, seed, run_dir), data=data,
                        resume=args.resume, overwrite=args.overwrite)
            key = json.dumps({**{kk: getattr(res.config, kk) for kk in RESUME_KEYS},
                              "epochs_done": len(res.history), "n_test": k, "protocol": PROTOCOL,
                              "noise_seed": TEST_NOISE_SEED}, sort_keys=True)
            scores = _cached(run_dir / SCORES_NAME, key, args.resume)
            if scores is None:
                scores = {"key": key, **evaluate_run(res.model, noisy.to(device), target.to(device),
                                                     regions, args)}
                _store(run_dir / SCORES_NAME, scores)
            last = res.history[-1]
            row["nets"][name] = {**scores, "train_loss": last["train_loss"], "val_loss": last["val_loss"],
                                 "run_time_s": res.total_time_s, "history": res.history}
        row["filters"] = run_filters(args, runs, level, config, seed,
                                     {s: v[:3] for s, v in sets.items()}, device)
        result["levels"][level.slug] = row
    return result


def run_table(args, out: Path, noise: str, seeds, device) -> str:
    """Train, evaluate and compare everything of one noise model; write its files."""
    t0 = time.perf_counter()
    name = table_name(noise, args.target)
    runs = out / "runs" / name
    levels = noise_levels(noise, args)
    per_seed = [run_seed(args, runs, levels, seed, device) for seed in seeds]
    probe = level_config(args, args.models[0], levels[0], seeds[0], runs)
    settings = tables.settings_of(args, probe, per_seed, noise, levels, device)
    return tables.write_table(out, name, args=args, levels=levels, per_seed=per_seed,
                              settings=settings, wall_s=time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    from speckle_models.reproduction.baselines import FILTERS

    p = argparse.ArgumentParser(prog="speckle-reproduce", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--noise", choices=(*NOISE_MODELS, "both"), default="gaussian",
                   help="gaussian (the paper's factors), rayleigh (standardized Rayleigh, "
                        "Karaoglu et al.'s levels) or both, each its own table (default gaussian)")
    p.add_argument("--factors", nargs="+", type=float, default=list(PAPER_NOISE_FACTORS),
                   help="Gaussian noise factors (default 1 5 10; 0: no added noise)")
    p.add_argument("--rayleigh-sigmas", nargs="+", type=float, default=list(RAYLEIGH_SIGMAS),
                   help="Rayleigh sigmas (default 0.1 0.25 0.5 0.75)")
    p.add_argument("--seeds", type=int,
                   help="seeds, each a replicate of the whole experiment (default: quick 1, medium/paper 3)")
    p.add_argument("--norm", choices=NORMS, help="Br-U-Net's norm (default fused)")
    p.add_argument("--baseline-count", type=int,
                   help="test images per seed every method is scored on "
                        "(default: quick 64, medium 128, paper 256)")
    p.add_argument("--filters", nargs="+", choices=FILTERS,
                   help="the classical filters (default: every installed one; BM3D needs the bm3d extra)")
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
    if args.target == "speckle-free" and args.noise != "gaussian":
        parser.error("--target speckle-free makes one table: use --noise gaussian "
                     "(--factors 0 --sigma-add 0 for the physical speckle alone)")
    out = Path(args.out)
    noises = NOISE_MODELS if args.noise == "both" else (args.noise,)
    seeds = [args.seed + i for i in range(args.seeds)]
    texts = []
    try:
        probe = config_from_args(args, model=args.models[0], noise_factor=args.factors[0], out=str(out))
        device = resolve_device(probe.device)
        if args.target == "speckle-free":
            check_target(load_data(probe), probe)
        for noise in noises:
            texts.append(run_table(args, out, noise, seeds, device))
    except (ValueError, FileNotFoundError, ImportError) as e:
        parser.error(str(e))
    print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
