"""Training-step benchmark cases: one Adamax step of Br-U-Net (each BatchRenorm backend) and
of D-U-Net (nn.BatchNorm2d), with a check that a fused Br-U-Net takes the reference's step.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .batch_renorm_cases import probe_kernel_backend
from .common import BATCH, IMAGE, KERNEL_BACKENDS, SMALL_BATCH, SMALL_IMAGE

TRAIN_IMPLS = ("br-unet-reference", "br-unet-triton", "br-unet-cuda", "br-unet-cpu", "d-unet-batchnorm2d")


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
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown implementation {name!r}")
    probe_kernel_backend(backend, device, torch.float32)
    return br_unet(norm="fused", norm_backend=backend).to(device), PAPER_HPARAMS["br-unet"]["lr"]


def train_step_fn(model, lr: float):
    """One optimizer step as models/loop.py takes it: forward, MSE, backward, Adamax."""
    opt = torch.optim.Adamax(model.parameters(), lr=lr)
    model.train()

    def step(noisy, clean):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(noisy), clean)
        loss.backward()
        opt.step()
        return loss
    return step


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
