"""Training-step benchmark cases: one Adamax step of Br-U-Net (each BatchRenorm backend) and
of D-U-Net (nn.BatchNorm2d), with a check that a fused Br-U-Net takes the reference's step.

Modes: every implementation runs eager; Br-U-Net with the default fused backend (the one
backend="auto" picks on the device when it is built: cuda on a GPU, cpu on a CPU; named, so a
missing one is skipped) and D-U-Net also run under torch.compile (Br-U-Net fullgraph: a graph
break fails the row) and captured in one CUDA graph (CUDA only). The check runs the kernels
eagerly: a compiled step draws other dropout masks than the reference's.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from speckle_kernels._backend import choose_backend

from .common import BATCH, IMAGE, KERNEL_BACKENDS, SMALL_BATCH, SMALL_IMAGE, Unavailable, compile_fresh
from .batch_renorm_act_cases import probe_block_backend

TRAIN_IMPLS = ("br-unet-reference", "br-unet-triton", "br-unet-cuda", "br-unet-cpu", "d-unet-batchnorm2d")
MODES = ("eager", "compiled", "graph")
TRAIN_ROWS = ([(impl, "eager") for impl in TRAIN_IMPLS]
              + [(impl, mode) for impl in ("br-unet-fused", "d-unet-batchnorm2d") for mode in MODES[1:]])


def train_shape(size: str, device: torch.device) -> tuple[int, int]:
    """(batch, image side) of the train-step benchmark."""
    return (BATCH, IMAGE) if size == "full" and device.type == "cuda" else (SMALL_BATCH, SMALL_IMAGE // 2)


def train_model(name: str, device: torch.device):
    """The network of implementation `name`, its fused layers pinned to one backend (so a
    missing backend is skipped, never replaced by the reference "auto" would fall back to)."""
    from speckle_models import PAPER_HPARAMS, br_unet, d_unet

    if name == "d-unet-batchnorm2d":
        return d_unet(norm="batchnorm").to(device), PAPER_HPARAMS["d-unet"]["lr"]
    if name == "br-unet-reference":
        return br_unet(norm="reference").to(device), PAPER_HPARAMS["br-unet"]["lr"]
    backend = name.rsplit("-", 1)[1]
    if backend == "fused":
        backend = choose_backend("auto", device, has_cpu_ext=True, has_cuda_ext=True)
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown implementation {name!r}")
    probe_block_backend(backend, device, torch.float32)  # Br-U-Net's norms are blocks (and one renorm)
    return br_unet(norm="fused", norm_backend=backend).to(device), PAPER_HPARAMS["br-unet"]["lr"]


def train_step_fn(model, lr: float, mode: str = "eager", fullgraph: bool = False):
    """One optimizer step as models/training/loop.py takes it: forward, MSE, backward, Adamax. mode
    "compiled" runs the model under torch.compile; "graph" makes the step capturable (see
    capture_step); every mode zeroes the gradients after the step, as the loop does."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    opt = torch.optim.Adamax(model.parameters(), lr=lr, capturable=mode == "graph")
    model.train()
    run = compile_fresh(model, fullgraph=fullgraph) if mode == "compiled" else model

    def step(noisy, clean):
        loss = F.mse_loss(run(noisy), clean)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=mode != "graph")
        return loss
    return step


def capture_step(step, noisy, clean, device: torch.device, warmup: int = 3):
    """The step captured in one CUDA graph after `warmup` eager steps on a side stream
    (speckle_models.training.loop's graph); returns a function replaying it on static inputs."""
    if device.type != "cuda":
        raise Unavailable("a CUDA graph needs a CUDA device")
    from speckle_models.training.loop import _GraphedStep

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step(noisy, clean)
    torch.cuda.current_stream().wait_stream(side)
    graphed = _GraphedStep(step, noisy, clean)
    return lambda: graphed(noisy, clean)


def train_batch(batch: int, image: int, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    clean = torch.rand(batch, 1, image, image, generator=g, device=device) * 2 - 1
    noisy = clean + 0.2 * torch.randn(batch, 1, image, image, generator=g, device=device)
    return noisy, clean


def check_train_step(name: str, model, batch: int, image: int, device) -> None:
    """A fused Br-U-Net takes the same first step as the reference one from the same weights
    and dropout draws: loss within 1e-4 relative (errors of ~1e-6 per layer, 13 norm layers)."""
    if not name.startswith("br-unet-") or name == "br-unet-reference":
        return
    ref = br_unet_reference_like(model)
    fused = copy.deepcopy(model)
    noisy, clean = train_batch(batch, image, device)
    losses = []
    for m in (fused, ref):
        torch.manual_seed(5)  # the same dropout masks
        losses.append(train_step_fn(m, 1e-4)(noisy, clean).item())
    if not math.isclose(losses[0], losses[1], rel_tol=1e-4):
        raise AssertionError(f"{name}: first-step loss {losses[0]:.8g}, reference {losses[1]:.8g}")


def br_unet_reference_like(model):
    """A reference-layer Br-U-Net holding `model`'s weights and buffers."""
    from speckle_kernels import FusedBatchRenorm2d, FusedBatchRenormAct2d

    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, (FusedBatchRenorm2d, FusedBatchRenormAct2d)):
            module.backend = "reference"
    return ref
