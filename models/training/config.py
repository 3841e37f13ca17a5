"""What a training run is: its settings (TrainConfig), the presets and the command-line
options that fill them, shared by speckle-train and speckle-reproduce.

Targets (TrainConfig.target):
- "clean" (the paper): the input is the data's image (on the phantom: a B-mode image with its
  physical speckle) plus the configured noise, the target is that image without the added noise.
- "speckle-free" (phantom only): the same input, the target is the speckle-free map the image
  was simulated from (data.*_clean), normalized the same way: the network despeckles. The
  added noise may then be zero (noise factor 0 and --sigma-add 0: physical speckle only).
- "self-supervised": no target at all. The input is the same, the loss is a self-supervised
  objective on it (training/self_supervised.py, method ss_method) whose mask is sized by the
  speckle correlation measured on the training images (or given: correlation). Works on the
  phantom, whose speckle-free maps are then dropped before training (never read), and on a
  folder of the user's scans (training/scan_folder.py: PNG/TIFF/DICOM, cines included).
  init: the checkpoint whose weights the run starts from (fine-tuning).

phantom: which phantom "--data phantom" is: "classic" (data/phantom.py as it is, so committed
tables stay reproducible) or "realistic" (data/realistic_phantom.py: domain randomised).
upsample: the U-Nets' upsampling, "transpose" (the paper's) or "resize" (networks/unet.py).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch

from speckle_kernels._backend import BACKENDS, check_backend_name
from speckle_kernels.noise_stream import DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT, DISTRIBUTIONS

from speckle_models import NORMS, UPSAMPLES, PAPER_BATCH_SIZE, PAPER_EPOCHS, PAPER_HPARAMS, check_model_name

# Seeds of the evaluation noise: fixed, so every model and run sees the same noisy images.
VAL_NOISE_SEED = 20_240_001
TEST_NOISE_SEED = 20_240_002

# Presets: "paper" is section 2/Table 1 (128x128, all images, 10 epochs, batch 32, width 32,
# Table 1's learning rates). "quick" is the same code path sized for a busy 2-core CPU: 500
# phantom images at 48x48, width 16, batch 4 and 6 epochs (600 optimizer steps, against ~1400
# for the paper preset). In ~500 steps Table 1's rates fail two of the models: Di-Conv-AE's
# 0.01 saturates its tanh units and stalls near the mean image, Br-U-Net's 0.0001 barely moves
# (section 2.2 itself says batch renormalization allows *higher* rates), so quick uses the
# rates below; --lr overrides either preset. Quick also runs one intra-op CPU thread: on a
# machine shared with other jobs, two OpenMP threads per process were measured 10-20x slower
# per step than one (spin-waiting threads fighting for the cores). --threads overrides.
# "medium" runs the paper's 128x128 on that CPU, sized for one noise model with 3 seeds
# (speckle-reproduce: 27 trainings for the Gaussian table) in about half an hour: 500 phantom
# images (400 train / 100 val), 128 test images, width 8, batch 4, 4 epochs (400 steps), quick's
# rates and one thread. Measured here (2026-12-02, load average ~4.5 from other jobs on the 2
# cores): one Br-U-Net training 67 s (4 epochs of ~16.5 s, 25 images/s, validation included);
# one epoch of a scaled-down run 10-14 s per network; the filters ~12 s per level on 128 test
# images; evaluation ~2 s per run. Extrapolated: ~33 min for the Gaussian table (3 levels),
# ~44 min for the Rayleigh one (4 levels). It is not trained to convergence: Br-U-Net's
# validation PSNR at x1 is 18.8, 24.2, 26.3, 28.0 dB over the 4 epochs (a rate of 0.005 instead
# of 0.002 gave 28.4), so medium tests the statistics at the paper's size, not its accuracy.
# "realtime" is medium with the width issue 25's measurements pick for real-time despeckling on
# a 2-core CPU: Br-U-Net widths 8, 16 and 32 trained on the phantom with the speckle-free target
# (medium, --target speckle-free --noise-factor 0 --sigma-add 0; 2026-12-03) reached validation
# PSNR 27.3, 27.7 and 25.3 dB, SSIM 0.683, 0.698 and 0.643 after the same 400 steps
# (benchmarks/results/cpu-2026-12-03/widths.md), while a width-8 frame costs 3.9 GFLOP at
# 480x640 against 15.5 and 61.9: width 8 is the only one near 30 frames/s on two cores, for
# ~0.3 dB against width 16. Use it with --target speckle-free.
PRESETS = {
    "paper": dict(image_size=128, count=None, test_count=None, epochs=PAPER_EPOCHS,
                  batch_size=PAPER_BATCH_SIZE, width=32, threads=None,
                  lr={m: h["lr"] for m, h in PAPER_HPARAMS.items()}),
    "quick": dict(image_size=48, count=500, test_count=64, epochs=6, batch_size=4, width=16,
                  threads=1,
                  lr={"di-conv-ae": 0.004, "d-unet": 0.005, "br-unet": 0.002}),
    "medium": dict(image_size=128, count=500, test_count=128, epochs=4, batch_size=4, width=8,
                   threads=1,
                   lr={"di-conv-ae": 0.004, "d-unet": 0.005, "br-unet": 0.002}),
    "realtime": dict(image_size=128, count=500, test_count=128, epochs=4, batch_size=4, width=8,
                     threads=1,
                     lr={"di-conv-ae": 0.004, "d-unet": 0.005, "br-unet": 0.002}),
}
TARGETS = ("clean", "speckle-free", "self-supervised")
PHANTOMS = ("classic", "realistic")


@dataclass
class TrainConfig:
    model: str
    out: str
    noise_factor: float = 1.0
    data: str = "phantom"
    preset: str = "quick"
    epochs: int = 6
    batch_size: int = 4
    lr: float | None = None          # None: Table 1's rate for the model (the CLI: the preset's)
    dropout: float | None = None     # None: Table 1's rate for the model
    width: int = 16
    image_size: int = 48
    count: int | None = 500
    test_count: int | None = 64
    val_fraction: float = 0.2
    norm: str | None = None          # U-Nets only; None: batchnorm (D-U-Net) / fused (Br-U-Net)
    norm_backend: str = "auto"       # the fused layers' kernel backend (speckle_kernels backends)
    distribution: str = "gaussian"
    sigma_mult: float | None = None  # None: speckle_kernels.noise defaults
    sigma_add: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None          # None: bf16 autocast on CUDA only
    channels_last: bool | None = None
    compile: bool = False
    cuda_graph: bool = False
    log_every: int = 20
    progress: bool = True
    cache_dir: str | None = None
    threads: int | None = None       # CPU intra-op threads; None: torch's default
    target: str = "clean"            # "clean" | "speckle-free" | "self-supervised" (module docstring)
    upsample: str | None = None      # U-Nets: "transpose" (None) | "resize"
    ss_method: str | None = None     # self-supervised only; None: self_supervised.DEFAULT_METHOD
    correlation: tuple | None = None # (axial, lateral) px; None: measured on the training images
    init: str | None = None          # checkpoint to start from (fine-tuning)
    phantom: str = "classic"         # "classic" | "realistic" (module docstring)
    phantom_seed: int | None = None  # the phantom's draw; None: the same as seed
    phantom_version: int | None = None   # phantom.PHYSICS; None: phantom.PHANTOM_VERSION

    def resolved(self) -> "TrainConfig":
        """Fill the model-dependent and noise defaults and check every value."""
        check_model_name(self.model)
        c = TrainConfig(**asdict(self))
        if c.lr is None:
            c.lr = PAPER_HPARAMS[c.model]["lr"]
        if c.dropout is None:
            c.dropout = PAPER_HPARAMS[c.model]["dropout"]
        if c.model == "di-conv-ae":
            if c.norm not in (None, "none"):
                raise ValueError("--norm applies to the U-Nets only (di-conv-ae has no normalization)")
            c.norm = "none"
        elif c.norm is None:
            c.norm = "batchnorm" if c.model == "d-unet" else "fused"
        elif c.norm not in NORMS:
            raise ValueError(f"unknown norm {c.norm!r}; expected one of {', '.join(NORMS)}")
        check_backend_name(c.norm_backend)
        if c.upsample not in (None, *UPSAMPLES):
            raise ValueError(f"unknown upsample {c.upsample!r}; expected one of {', '.join(UPSAMPLES)}")
        if c.model == "di-conv-ae" and c.upsample == "resize":
            raise ValueError("--upsample applies to the U-Nets only (di-conv-ae has its own decoder)")
        c.upsample = c.upsample or "transpose"
        if c.phantom not in PHANTOMS:
            raise ValueError(f"unknown phantom {c.phantom!r}; expected one of {', '.join(PHANTOMS)}")
        if c.target == "self-supervised":
            from speckle_models.training.self_supervised import DEFAULT_METHOD, METHODS

            c.ss_method = c.ss_method or DEFAULT_METHOD
            if c.ss_method not in METHODS:
                raise ValueError(f"unknown self-supervised method {c.ss_method!r}; expected one of "
                                 f"{', '.join(METHODS)}")
        elif c.ss_method is not None:
            raise ValueError("--ss-method goes with --target self-supervised")
        if c.correlation is not None:
            c.correlation = tuple(int(v) for v in c.correlation)
            if len(c.correlation) != 2 or min(c.correlation) < 1:
                raise ValueError(f"correlation must be (axial, lateral) >= 1 px, got {c.correlation!r}")
        if c.sigma_mult is None or c.sigma_add is None:
            c.sigma_mult = DEFAULT_SIGMA_MULT if c.sigma_mult is None else c.sigma_mult
            c.sigma_add = DEFAULT_SIGMA_ADD if c.sigma_add is None else c.sigma_add
        if c.preset not in PRESETS:
            raise ValueError(f"unknown preset {c.preset!r}; expected one of {', '.join(PRESETS)}")
        if c.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {c.distribution!r}")
        if c.target not in TARGETS:
            raise ValueError(f"unknown target {c.target!r}; expected one of {', '.join(TARGETS)}")
        for name in ("epochs", "batch_size", "width", "image_size", "log_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if not (c.lr > 0 and math.isfinite(c.lr)) or not 0 < c.val_fraction < 1:
            raise ValueError("lr must be positive and val_fraction in (0, 1)")
        if c.noise_factor < 0:
            raise ValueError(f"noise factor must be >= 0, got {c.noise_factor}")
        from speckle_models.data.phantom import PHANTOM_VERSION, physics_of

        c.phantom_seed = c.seed if c.phantom_seed is None else c.phantom_seed
        if isinstance(c.phantom_seed, bool) or not isinstance(c.phantom_seed, int) or c.phantom_seed < 0:
            raise ValueError(f"phantom_seed must be a non-negative int, got {c.phantom_seed!r}")
        c.phantom_version = physics_of(PHANTOM_VERSION if c.phantom_version is None
                                       else c.phantom_version).version
        return c


# The fields that must agree between a checkpoint and a run that resumes it, and the value a
# field had in checkpoints written before it existed.
RESUME_KEYS = ("model", "noise_factor", "data", "batch_size", "lr", "dropout", "width",
               "image_size", "count", "val_fraction", "norm", "distribution", "sigma_mult",
               "sigma_add", "seed", "cuda_graph", "target", "upsample", "ss_method", "correlation",
               "init", "phantom", "phantom_seed", "phantom_version")
# checkpoints written before these fields existed: the paper's target and upsampling, the classic
# phantom drawn with seed 0 at physics version 2
RESUME_DEFAULTS = {"target": "clean", "upsample": "transpose", "ss_method": None, "correlation": None,
                   "init": None, "phantom": "classic", "phantom_seed": 0, "phantom_version": 2}


def resume_mismatch(saved: dict, config: "TrainConfig") -> list[str]:
    """The RESUME_KEYS on which a checkpoint's saved config and `config` disagree."""
    def value(v):  # a checkpoint stores tuples as lists
        return tuple(v) if isinstance(v, list) else v

    return [k for k in RESUME_KEYS if value(saved.get(k, RESUME_DEFAULTS.get(k))) != value(getattr(config, k))]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def add_common_arguments(p: argparse.ArgumentParser, *, distribution: bool = True) -> None:
    """The options speckle-train and speckle-reproduce share; distribution=False leaves out
    --distribution (speckle-reproduce picks it per table with --noise)."""
    p.add_argument("--preset", default="quick", help=f"{' | '.join(PRESETS)} (default quick)")
    p.add_argument("--data", default="phantom", help="'phantom' or a path to ultrasound images")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--width", type=int, help="channels of the first level (16 quick, 32 paper)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--count", type=int, help="images to load for train+val (default: preset)")
    p.add_argument("--test-count", type=int)
    if distribution:
        p.add_argument("--distribution", default="gaussian", choices=DISTRIBUTIONS)
    p.add_argument("--target", default="clean", choices=TARGETS,
                   help="clean: the image without the added noise (the paper); speckle-free: "
                        "the phantom's speckle-free map (despeckling); self-supervised: no target, "
                        "the speckled images alone (--data phantom or a folder of your scans)")
    p.add_argument("--ss-method", help="self-supervised objective: blind-spot (default) | neighbor2neighbor")
    p.add_argument("--correlation-length", metavar="AXIAL,LATERAL",
                   help="speckle decorrelation lengths in px (default: measured on the training images)")
    p.add_argument("--phantom", default="classic", choices=PHANTOMS,
                   help="with --data phantom: classic (the committed tables') or realistic (domain randomised)")
    p.add_argument("--upsample", choices=UPSAMPLES,
                   help="U-Net upsampling: transpose (the paper's, default) or resize (bilinear x2 + conv 3x3)")
    p.add_argument("--phantom-seed", type=int,
                   help="the phantom's draw (default: --seed, so seeds vary the data too)")
    p.add_argument("--phantom-version", type=int,
                   help="phantom physics version (default: the current; 2: the phantom of the "
                        "tables committed before 2026-12-03)")
    p.add_argument("--sigma-mult", type=float, help="multiplicative sigma before the factor")
    p.add_argument("--sigma-add", type=float, help="additive noise sigma")
    p.add_argument("--cache-dir")
    p.add_argument("--threads", type=int, help="CPU threads (quick: 1, paper: torch's default)")
    p.add_argument("--norm-backend", default="auto",
                   choices=BACKENDS,
                   help="kernels of the fused norm layers (default auto: the CUDA extension, else Triton, on a GPU; the C++ kernel on CPU)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--cuda-graph", action="store_true", help="capture the training step (CUDA)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress reads")


def _correlation_arg(text):
    if text is None:
        return None
    from speckle_models.training.self_supervised import parse_correlation

    return parse_correlation(text)


def config_from_args(args: argparse.Namespace, *, model: str, noise_factor: float, out: str,
                     **overrides) -> TrainConfig:
    """A resolved TrainConfig from the shared CLI options, the preset and per-run overrides
    (lr, dropout, norm, seed, distribution, sigma_mult...; None keeps the default)."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[args.preset])
    fields["lr"] = fields["lr"][model]
    for key in fields:
        if getattr(args, key, None) is not None:
            fields[key] = getattr(args, key)
    fields.update(data=args.data, preset=args.preset,
                  distribution=getattr(args, "distribution", "gaussian"),
                  sigma_mult=args.sigma_mult, sigma_add=args.sigma_add, seed=args.seed,
                  device=args.device, amp=False if args.no_amp else None,
                  compile=args.compile, cuda_graph=args.cuda_graph, log_every=args.log_every,
                  norm_backend=args.norm_backend, target=args.target,
                  upsample=getattr(args, "upsample", None), ss_method=getattr(args, "ss_method", None),
                  correlation=_correlation_arg(getattr(args, "correlation_length", None)),
                  phantom=getattr(args, "phantom", "classic"),
                  phantom_seed=getattr(args, "phantom_seed", None),
                  phantom_version=getattr(args, "phantom_version", None),
                  progress=not args.no_progress, cache_dir=args.cache_dir)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(model=model, out=out, noise_factor=noise_factor, **fields).resolved()
