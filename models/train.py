"""speckle-train: train one of the paper's denoisers at one noise factor, resumably.

    speckle-train --model br-unet --noise-factor 5 --data phantom --preset quick --out runs/br5

Per epoch: train loss (MSE on images normalized to [-1, 1], averaged per image), validation
loss, PSNR and SSIM (predictions clamped to [-1, 1], then mapped to [0, 1]), wall time and
images/s. Validation images get their noise once, from a fixed seed that depends only on the
noise settings, so every model and every epoch sees the same noisy images.

Files in --out, each written atomically (temp file in the same folder + os.replace):
    checkpoint.pt   model, optimizer, torch RNG states (tensors), epoch, history, config;
                    loadable with torch.load(weights_only=True)
    metrics.json / metrics.csv, train_loss.png (paper fig. 6), train_samples.png (fig. 7)

--resume continues from checkpoint.pt at the epoch boundary it recorded: the weights, the
optimizer, the RNG and the epoch counter come back, and the data order and the training noise
depend only on (seed, epoch), so a killed run resumed gives the same weights bit for bit on a
CPU as a run that was never stopped.

On a GPU: the data stays on the device (DeviceBatches), bf16 autocast and channels_last are on,
cudnn.benchmark is set; --compile wraps the model in torch.compile; --cuda-graph captures the
whole step (forward, backward, Adamax) after three eager warm-up steps and replays it (full
batches only: the last partial batch of an epoch is dropped). The running loss is summed on
the device and read back once every --log-every steps.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from speckle_kernels.metrics import from_normalized, psnr, ssim

from . import distributed
from . import MODEL_NAMES, NORMS, PAPER_BATCH_SIZE, PAPER_EPOCHS, PAPER_HPARAMS, build_model, check_model_name

CHECKPOINT_FORMAT = "speckle-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
DISTRIBUTIONS = ("gaussian", "rayleigh")
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
PRESETS = {
    "paper": dict(image_size=128, count=None, test_count=None, epochs=PAPER_EPOCHS,
                  batch_size=PAPER_BATCH_SIZE, width=32, threads=None,
                  lr={m: h["lr"] for m, h in PAPER_HPARAMS.items()}),
    "quick": dict(image_size=48, count=500, test_count=64, epochs=6, batch_size=4, width=16,
                  threads=1,
                  lr={"di-conv-ae": 0.004, "d-unet": 0.005, "br-unet": 0.002}),
}


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
        from speckle_kernels._backend import check_backend_name

        check_backend_name(c.norm_backend)
        if c.sigma_mult is None or c.sigma_add is None:
            from speckle_kernels.noise import DEFAULT_SIGMA_ADD, DEFAULT_SIGMA_MULT

            c.sigma_mult = DEFAULT_SIGMA_MULT if c.sigma_mult is None else c.sigma_mult
            c.sigma_add = DEFAULT_SIGMA_ADD if c.sigma_add is None else c.sigma_add
        if c.preset not in PRESETS:
            raise ValueError(f"unknown preset {c.preset!r}; expected one of {', '.join(PRESETS)}")
        if c.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {c.distribution!r}")
        for name in ("epochs", "batch_size", "width", "image_size", "log_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if not (c.lr > 0 and math.isfinite(c.lr)) or not 0 < c.val_fraction < 1:
            raise ValueError("lr must be positive and val_fraction in (0, 1)")
        if c.noise_factor < 0:
            raise ValueError(f"noise factor must be >= 0, got {c.noise_factor}")
        return c


# The fields that must agree between a checkpoint and a run that resumes it.
_RESUME_KEYS = ("model", "noise_factor", "data", "batch_size", "lr", "dropout", "width",
                "image_size", "count", "val_fraction", "norm", "distribution", "sigma_mult",
                "sigma_add", "seed", "cuda_graph")


# ----------------------------------------------------------------------------- files

def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path through a temp file in the same folder and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a speckle-train checkpoint; ValueError if it is corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, garbage...
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a speckle-train checkpoint (no '{CHECKPOINT_FORMAT}' tag)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {ckpt.get('version')!r}; "
                         f"this tool reads version {CHECKPOINT_VERSION}")
    missing = {"config", "epoch", "model", "optimizer", "rng", "history"} - set(ckpt)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(sorted(missing))}")
    return ckpt


def write_metrics(out: Path, config: TrainConfig, history: list[dict], extra: dict | None = None) -> None:
    doc = {"config": asdict(config), "history": history,
           "total_time_s": sum(h["epoch_time_s"] for h in history)}
    if extra:
        doc.update(extra)
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


# ----------------------------------------------------------------------------- devices, data

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


def load_data(config: TrainConfig):
    """The dataset the config names (phantom or a folder/file of ultrasound images)."""
    from speckle_kernels.data import load_dataset

    if config.data != "phantom" and not os.path.exists(config.data):
        raise ValueError(f"data path {config.data!r} does not exist")
    return load_dataset(config.data, image_size=config.image_size, seed=config.seed,
                        val_fraction=config.val_fraction, count=config.count,
                        test_count=config.test_count, cache_dir=config.cache_dir,
                        progress=config.progress)


def noisy_eval_set(images_u8: torch.Tensor, config: TrainConfig, seed: int, device: torch.device):
    """(noisy, clean) normalized images with the fixed evaluation noise, on the device."""
    from speckle_kernels.noise import make_noisy_batch

    return make_noisy_batch(images_u8.to(device), factor=config.noise_factor,
                            sigma_mult=config.sigma_mult, sigma_add=config.sigma_add,
                            distribution=config.distribution, seed=seed, offset=0)


@torch.no_grad()
def predict(model: nn.Module, noisy: torch.Tensor, *, batch_size: int = 64, amp: bool = False,
            channels_last: bool = False) -> torch.Tensor:
    """Denoised images (float32, clamped to [-1, 1]) in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, noisy.shape[0], batch_size):
            x = noisy[i:i + batch_size]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
                y = model(x)
            outs.append(y.float().clamp_(-1, 1))
    finally:
        model.train(was_training)
    return torch.cat(outs).contiguous()


def evaluate(model: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, **kw) -> dict:
    """MSE (normalized space), mean PSNR and SSIM (on [0, 1] images) of the model's output."""
    pred = predict(model, noisy, **kw)
    return image_scores(pred, clean.float())


def image_scores(pred: torch.Tensor, clean: torch.Tensor) -> dict:
    p, c = from_normalized(pred.float()), from_normalized(clean.float())
    return {"loss": F.mse_loss(pred.float(), clean.float()).item(),
            "psnr": psnr(p, c).mean().item(), "ssim": ssim(p, c).mean().item()}


# ----------------------------------------------------------------------------- the step

class _GraphedStep:
    """The whole training step captured in one CUDA graph (static input buffers)."""

    def __init__(self, step_fn: Callable, noisy: torch.Tensor, clean: torch.Tensor):
        self.noisy = noisy.clone()
        self.clean = clean.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step_fn(self.noisy, self.clean)

    def __call__(self, noisy, clean):
        self.noisy.copy_(noisy, non_blocking=True)
        self.clean.copy_(clean, non_blocking=True)
        self.graph.replay()
        return self.loss


class StopTraining(Exception):
    """Raised by a callback to stop a run as a kill would (tests use it)."""


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    out: Path | None = None

    @property
    def total_time_s(self) -> float:
        return sum(h["epoch_time_s"] for h in self.history)


def train(config: TrainConfig, *, data=None, resume: bool = False, overwrite: bool = False,
          on_step: Callable[[int, int], None] | None = None, plots: bool = True) -> TrainResult:
    """Train (or resume) one run; returns the model and the per-epoch history.

    data: a loaded UltrasoundData (reproduce shares one across runs); None loads config.data.
    on_step(epoch, step) is called after every optimizer step; raising StopTraining there
    leaves the files as a kill would (the checkpoint of the last finished epoch).
    """
    config = config.resolved()
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT_NAME
    ckpt = None
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["config"]
        diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)]
        if saved.get("model") != config.model:
            raise ValueError(f"{ckpt_path} holds a {saved.get('model')!r} run, not {config.model!r}")
        if diff:
            raise ValueError(f"{ckpt_path} was written with other settings ({', '.join(diff)}); "
                             "resume with the same options or use another --out")
    elif ckpt_path.exists() and not overwrite:
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it "
                         "or --overwrite to start again")

    dctx, device = distributed.setup(resolve_device(config.device))
    cuda = device.type == "cuda"
    amp = cuda if config.amp is None else config.amp
    channels_last = cuda if config.channels_last is None else config.channels_last
    if config.cuda_graph and not cuda:
        raise ValueError("--cuda-graph needs a CUDA device")
    if cuda:
        torch.backends.cudnn.benchmark = True
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if data is None:
        data = load_data(config)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_model(config.model, norm=None if config.model == "di-conv-ae" else config.norm,
                        width=config.width, dropout=config.dropout).to(device)
    for m in model.modules():  # the fused layers' kernels: auto, or one named backend
        if hasattr(m, "backend") and m.backend != "reference":
            m.backend = config.norm_backend
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = distributed.sync_norms(model, dctx, device)
    opt = torch.optim.Adamax(model.parameters(), lr=config.lr, capturable=config.cuda_graph)
    history: list[dict] = []
    start_epoch = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"{ckpt_path} does not fit this model: {e}") from e
        _set_rng_state(ckpt["rng"], device)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt["history"])
    run_model = distributed.data_parallel(model, dctx, device)
    run_model = torch.compile(run_model) if config.compile else run_model

    from speckle_kernels.data import DeviceBatches

    train_batches = DeviceBatches(
        data.train, config.batch_size, factor=config.noise_factor, sigma_mult=config.sigma_mult,
        sigma_add=config.sigma_add, distribution=config.distribution, seed=config.seed,
        device=device, out_dtype=torch.float32, shuffle=True,
        drop_last=config.cuda_graph or dctx.enabled,  # every rank must take the same steps
        rank=dctx.rank, world_size=dctx.world_size)
    val_noisy, val_clean = noisy_eval_set(data.val, config, VAL_NOISE_SEED, device)
    eval_kw = dict(batch_size=max(config.batch_size, 64), amp=amp, channels_last=channels_last)

    loss_sum = torch.zeros((), device=device)

    def step(noisy, clean):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = run_model(noisy)
        loss = F.mse_loss(pred.float(), clean.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not config.cuda_graph)
        loss_sum.add_(loss.detach() * noisy.shape[0])
        return loss

    graphed = None
    for epoch in range(start_epoch, config.epochs):
        model.train()
        loss_sum.zero_()
        seen = 0
        t0 = time.perf_counter()
        bar = _progress(len(train_batches), f"{config.model} x{config.noise_factor:g} "
                        f"epoch {epoch + 1}/{config.epochs}", config.progress and dctx.is_main)
        t_log, seen_log = t0, 0
        for i, (noisy, clean) in enumerate(train_batches.batches(epoch)):
            if channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
                clean = clean.contiguous(memory_format=torch.channels_last)
            if config.cuda_graph:
                graphed = _cuda_graph_step(graphed, step, noisy, clean, opt)
            else:
                step(noisy, clean)
            seen += noisy.shape[0]
            if on_step is not None:
                on_step(epoch, i)
            if bar is not None:
                bar.update(1)
                if (i + 1) % config.log_every == 0 or i + 1 == len(train_batches):
                    now = time.perf_counter()
                    rate = (seen - seen_log) / max(now - t_log, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", img_s=f"{rate:.0f}")
                    t_log, seen_log = now, seen
        if bar is not None:
            bar.close()
        if seen == 0:
            raise ValueError("the training set gave no batch (fewer images than one batch?)")
        train_loss = distributed.mean_over_ranks(loss_sum / seen, dctx).item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {train_loss})")
        val = evaluate(run_model, val_noisy, val_clean, **eval_kw)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
               "val_psnr": val["psnr"], "val_ssim": val["ssim"], "epoch_time_s": elapsed,
               "images_per_s": seen / elapsed}
        history.append(row)
        if dctx.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(config),
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": _rng_state(device), "history": history})
            write_metrics(out, config, history)
        distributed.barrier(dctx)
        _say(config, f"epoch {epoch + 1}/{config.epochs}: train {train_loss:.5f}  val {val['loss']:.5f}  "
                     f"PSNR {val['psnr']:.2f} dB  SSIM {val['ssim']:.4f}  {elapsed:.1f} s")
    if plots and history and dctx.is_main:
        from .plots import loss_curves, sample_grid

        loss_curves(history, out / "train_loss.png",
                    title=f"{config.model}, noise x{config.noise_factor:g}")
        k = min(4, val_noisy.shape[0])
        # the bare model: only rank 0 draws, so no collective may run here
        sample_grid(val_clean[:k], val_noisy[:k], predict(model, val_noisy[:k], **eval_kw),
                    out / "train_samples.png", title=f"{config.model}, noise x{config.noise_factor:g}")
    return TrainResult(model=model, config=config, history=history, out=out)


def _cuda_graph_step(graphed, step, noisy, clean, opt):
    """Eager warm-up on a side stream for three steps, then capture once and replay."""
    if graphed is None or isinstance(graphed, int):
        done = graphed or 0
        if done < 3:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(noisy, clean)
            torch.cuda.current_stream().wait_stream(side)
            return done + 1
        opt.zero_grad(set_to_none=True)
        graphed = _GraphedStep(step, noisy, clean)
        graphed.graph.replay()  # capture records without running: run this batch once
        return graphed
    graphed(noisy, clean)
    return graphed


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _say(config: TrainConfig, text: str) -> None:
    if config.progress and int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 speaks
        print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- CLI

def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="paper | quick (default quick)")
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
    p.add_argument("--distribution", default="gaussian", choices=DISTRIBUTIONS)
    p.add_argument("--sigma-mult", type=float, help="multiplicative sigma before the factor")
    p.add_argument("--sigma-add", type=float, help="additive noise sigma")
    p.add_argument("--cache-dir")
    p.add_argument("--threads", type=int, help="CPU threads (quick: 1, paper: torch's default)")
    p.add_argument("--norm-backend", default="auto",
                   choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="kernels of the fused norm layers (default auto: the CUDA extension, else Triton, on a GPU; the C++ kernel on CPU)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--cuda-graph", action="store_true", help="capture the training step (CUDA)")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress reads")


def config_from_args(args: argparse.Namespace, *, model: str, noise_factor: float, out: str,
                     **overrides) -> TrainConfig:
    """A resolved TrainConfig from the shared CLI options, the preset and per-run overrides
    (lr, dropout, norm; None keeps the model's default)."""
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    sized = dict(PRESETS[args.preset])
    sized["lr"] = sized["lr"][model]
    for key in sized:
        if getattr(args, key, None) is not None:
            sized[key] = getattr(args, key)
    sized.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(model=model, out=out, noise_factor=noise_factor, data=args.data,
                      preset=args.preset, distribution=args.distribution,
                      sigma_mult=args.sigma_mult, sigma_add=args.sigma_add, seed=args.seed,
                      device=args.device, amp=False if args.no_amp else None,
                      compile=args.compile, cuda_graph=args.cuda_graph, log_every=args.log_every,
                      norm_backend=args.norm_backend,
                      progress=not args.no_progress, cache_dir=args.cache_dir, **sized)
    return cfg.resolved()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speckle-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=MODEL_NAMES)
    p.add_argument("--noise-factor", type=float, default=1.0, help="multiplicative noise factor (1, 5, 10)")
    p.add_argument("--norm", choices=NORMS, help="U-Net norm (default: batchnorm D-U-Net, fused Br-U-Net)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's; Table 1 for paper)")
    p.add_argument("--dropout", type=float, help="dropout (default: Table 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing run")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, model=args.model, noise_factor=args.noise_factor,
                                  out=args.out, lr=args.lr, dropout=args.dropout, norm=args.norm)
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    finally:
        distributed.teardown_if_initialized()
    last = result.history[-1]
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"model": config.model, "noise_factor": config.noise_factor, **last,
                          "total_time_s": result.total_time_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
