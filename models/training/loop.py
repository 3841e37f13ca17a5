"""The training loop of speckle-train: one run at one noise factor, resumable.

Per epoch: train loss (MSE on images normalized to [-1, 1], averaged per image), validation
loss, PSNR and SSIM (predictions clamped to [-1, 1], then mapped to [0, 1]), wall time and
images/s. Files in config.out, each written atomically: checkpoint.pt, metrics.json/csv
(checkpoint.py), train_loss.png (paper fig. 6) and train_samples.png (fig. 7) (plots.py).

config.target "speckle-free" trains against the phantom's speckle-free maps (pairs.py makes the
batches; validation scores are against the maps too); data without such maps is refused.
config.target "self-supervised" drops the maps, measures the speckle correlation on the training
images and trains with self_supervised.py's objective (validation: the objective on the
validation images with fixed masks; no PSNR or SSIM, there being no truth). config.init
starts from another run's weights (fine-tuning; a resumed run starts from its own checkpoint).

Resuming continues from checkpoint.pt at the epoch boundary it recorded: the weights, the
optimizer, the RNG and the epoch counter come back, and the data order and the training noise
depend only on (seed, epoch), so a killed run resumed gives the same weights bit for bit on a
CPU as a run that was never stopped.

On a GPU: the data stays on the device (DeviceBatches), bf16 autocast and channels_last are on,
cudnn.benchmark is set; config.compile wraps the model in torch.compile; config.cuda_graph
captures the whole step (forward, backward, Adamax) after three eager warm-up steps and replays
it (full batches only: the last partial batch of an epoch is dropped). The running loss is
summed on the device and read back once every log_every steps.
"""
from __future__ import annotations

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

from speckle_models.data.datasets import DeviceBatches

from speckle_models import build_model
from speckle_models.training import distributed, self_supervised
from speckle_models.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINT_VERSION, load_checkpoint, load_init_weights, save_checkpoint, write_metrics
from speckle_models.training.config import VAL_NOISE_SEED, TrainConfig, resolve_device, resume_mismatch
from speckle_models.training.evaluate import check_target, eval_pair, evaluate, load_data, predict
from speckle_models.networks.flops import step_flops, throughput_note
from speckle_models.training.pairs import PairBatches
from speckle_models.plots import loss_curves, sample_grid


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
        diff = resume_mismatch(saved, config)
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
    objective = corr = None
    if config.target == "self-supervised":
        data, objective, corr = self_supervised.prepare(data, config)
        _say(config, self_supervised.describe(corr))
    check_target(data, config)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_model(config.model, norm=None if config.model == "di-conv-ae" else config.norm,
                        width=config.width, dropout=config.dropout,
                        norm_backend=config.norm_backend, upsample=config.upsample).to(device)
    if config.init is not None and ckpt is None:
        load_init_weights(model, config.init)
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

    batch_kw = dict(
        factor=config.noise_factor, sigma_mult=config.sigma_mult, sigma_add=config.sigma_add,
        distribution=config.distribution, seed=config.seed, device=device,
        out_dtype=torch.float32, shuffle=True,
        drop_last=config.cuda_graph or dctx.enabled,  # every rank must take the same steps
        rank=dctx.rank, world_size=dctx.world_size)
    if config.target == "speckle-free":
        train_batches = PairBatches(data.train, data.train_clean, config.batch_size, **batch_kw)
    else:
        train_batches = DeviceBatches(data.train, config.batch_size, **batch_kw)
    val_noisy, val_clean = eval_pair(data, "val", config, VAL_NOISE_SEED, device)
    eval_kw = dict(batch_size=max(config.batch_size, 64), amp=amp, channels_last=channels_last)

    loss_sum = torch.zeros((), device=device)

    def forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return run_model(x)

    def step(noisy, clean):
        if objective is None:
            loss = F.mse_loss(forward(noisy).float(), clean.float())
        else:
            loss = objective(forward, noisy)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not config.cuda_graph)
        loss_sum.add_(loss.detach() * noisy.shape[0])
        return loss

    graphed = None
    flops_per_image = None
    if start_epoch < config.epochs:
        example = val_noisy[:config.batch_size]
        flops_per_image = step_flops(model, example) / example.shape[0]
        _say(config, f"step: {flops_per_image * config.batch_size / 1e9:.1f} GFLOP forward+backward "
                     f"at batch {config.batch_size} (torch.utils.flop_counter)")
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
        train_loss = distributed.mean_over_ranks(loss_sum / seen, dctx).item()  # syncs
        compute = throughput_note(flops_per_image, seen, time.perf_counter() - t0, device)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {train_loss})")
        if objective is None:
            val = evaluate(run_model, val_noisy, val_clean, **eval_kw)
        else:
            val = {"loss": self_supervised.validation_loss(objective, run_model, val_noisy, seed=VAL_NOISE_SEED,
                                                           batch_size=eval_kw["batch_size"], amp=amp),
                   "psnr": None, "ssim": None}
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
               "val_psnr": val["psnr"], "val_ssim": val["ssim"], "epoch_time_s": elapsed,
               "images_per_s": seen / elapsed, "train_tflops": compute["tflops"],
               "bf16_peak_fraction": compute["bf16_peak_fraction"]}
        history.append(row)
        if dctx.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(config),
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": _rng_state(device), "history": history,
                **({"speckle_correlation": corr.as_dict()} if corr is not None else {})})
            write_metrics(out, config, history,
                          {"speckle_correlation": corr.as_dict()} if corr is not None else None)
        distributed.barrier(dctx)
        scores = f"PSNR {val['psnr']:.2f} dB  SSIM {val['ssim']:.4f}  " if val["psnr"] is not None else ""
        _say(config, f"epoch {epoch + 1}/{config.epochs}: train {train_loss:.5f}  val {val['loss']:.5f}  "
                     f"{scores}{elapsed:.1f} s  {_compute_text(compute)}")
    # a finished run resumed trains nothing: its figures are redrawn only if missing
    figures = (out / "train_loss.png", out / "train_samples.png")
    redraw = start_epoch < config.epochs or not all(f.exists() for f in figures)
    if plots and history and dctx.is_main and redraw:
        title = (f"{config.model}, {config.distribution} noise x{config.noise_factor:g} "
                 f"(sigma {config.sigma_mult:g})" + ("" if config.target == "clean" else f", {config.target} target"))
        loss_curves(history, figures[0], title=title)
        k = min(4, val_noisy.shape[0])
        # the bare model: only rank 0 draws, so no collective may run here
        sample_grid(val_clean[:k] if objective is None else None, val_noisy[:k],
                    predict(model, val_noisy[:k], **eval_kw), figures[1], title=title)
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


def _compute_text(compute: dict) -> str:
    text = f"{compute['tflops']:.3g} TFLOP/s"
    fraction = compute["bf16_peak_fraction"]
    return text + (f" ({100 * fraction:.1f}% of bf16 peak)" if fraction is not None else "")


def _say(config: TrainConfig, text: str) -> None:
    if config.progress and int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 speaks
        print(text, file=sys.stderr, flush=True)
