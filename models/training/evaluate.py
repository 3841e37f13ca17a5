"""Evaluation of a network on images with fixed noise: the data a config names, the noisy
evaluation sets, batched prediction and the scores (MSE, PSNR, SSIM).

Validation and test images get their noise once, from a fixed seed that depends only on the
noise settings (config.VAL_NOISE_SEED / TEST_NOISE_SEED), so every model and every epoch sees
the same noisy images. The target of an evaluation set follows config.target: the image itself
("clean") or its speckle-free map ("speckle-free", phantom only).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from speckle_models.metrics.psnr_ssim import from_normalized, psnr, ssim

from speckle_models.training.config import TrainConfig


def load_data(config: TrainConfig):
    """The dataset the config names: the phantom (config.phantom's kind), a Kaggle-layout
    folder, or, for a self-supervised run, any folder of the user's scans (scan_folder.py)."""
    from speckle_models.data.datasets import load_dataset
    from speckle_models.data.phantom import PHANTOM_VERSION

    if config.data != "phantom" and not os.path.exists(config.data):
        raise ValueError(f"data path {config.data!r} does not exist")
    if config.data != "phantom" and config.target == "self-supervised":
        from speckle_models.training.scan_folder import load_scan_folder

        return load_scan_folder(config.data, image_size=config.image_size, seed=config.seed,
                                val_fraction=config.val_fraction, count=config.count,
                                progress=config.progress)
    return load_dataset(config.data, image_size=config.image_size, seed=config.seed,
                        val_fraction=config.val_fraction, count=config.count,
                        test_count=config.test_count, cache_dir=config.cache_dir,
                        progress=config.progress, phantom=config.phantom,
                        phantom_seed=config.phantom_seed or 0,
                        phantom_version=config.phantom_version or PHANTOM_VERSION)


def check_target(data, config: TrainConfig) -> None:
    """ValueError when config.target needs speckle-free maps that `data` does not have."""
    if config.target == "speckle-free" and any(
            getattr(data, f"{part}_clean", None) is None for part in ("train", "val", "test")):
        name = getattr(data, "source", "") or config.data
        raise ValueError(f"--target speckle-free needs speckle-free maps, and the data "
                         f"{name!r} has none (only the built-in phantom has them)")


def eval_pair(data, split: str, config: TrainConfig, seed: int, device: torch.device,
              limit: int | None = None):
    """(noisy input, target) of data.<split> (its first `limit` images), normalized, on the
    device: the fixed evaluation noise on the image, the target config.target names. The first
    k images get the same noise as in the whole set (the noise stream is per element)."""
    from speckle_models.training.pairs import normalize_u8

    check_target(data, config)
    images = getattr(data, split)[:limit]
    noisy, clean = noisy_eval_set(images, config, seed, device)
    if config.target == "speckle-free":
        clean = normalize_u8(getattr(data, f"{split}_clean")[:limit].to(device), noisy.dtype)
    return noisy, clean


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


def per_image_scores(pred01: torch.Tensor, target01: torch.Tensor) -> dict:
    """{"psnr": (N,), "ssim": (N,)} float64 CPU tensors, one score per image in [0, 1]."""
    return {"psnr": psnr(pred01, target01).cpu(), "ssim": ssim(pred01, target01).cpu()}


def image_scores(pred: torch.Tensor, clean: torch.Tensor) -> dict:
    per = per_image_scores(from_normalized(pred.float()), from_normalized(clean.float()))
    return {"loss": F.mse_loss(pred.float(), clean.float()).item(),
            "psnr": per["psnr"].mean().item(), "ssim": per["ssim"].mean().item()}
