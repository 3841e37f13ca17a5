"""Training batches for the speckle-free target: (noisy speckled image, speckle-free map) pairs.

speckle_models.data.datasets.DeviceBatches makes (noisy, clean) from one uint8 set, the target being
the image itself. PairBatches is DeviceBatches with a second uint8 set of the same shape (the
speckle-free maps): each batch takes the same permutation indices in both, makes the input with
make_noisy_batch on the speckled images (the same noise counters DeviceBatches uses, so the
input of a batch is bit for bit the input DeviceBatches gives) and normalizes the maps as the
images are, (v / 255 - 0.5) / 0.5.
"""
from __future__ import annotations

import torch

from speckle_models.data.datasets import DeviceBatches


def normalize_u8(images_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images -> (v - 0.5) / 0.5 with v = u8 / 255 in float32, then dtype: bit for bit
    make_noisy_batch's clean output."""
    v = images_u8.to(torch.float32) / 255.0
    return ((v - 0.5) / 0.5).to(dtype)


class PairBatches(DeviceBatches):
    """DeviceBatches over `images_u8` whose batches' targets are `targets_u8` (same indices)."""

    def __init__(self, images_u8: torch.Tensor, targets_u8: torch.Tensor, batch_size: int, **kw):
        super().__init__(images_u8, batch_size, **kw)
        if not isinstance(targets_u8, torch.Tensor) or targets_u8.dtype != torch.uint8:
            raise TypeError("targets_u8 must be a uint8 tensor")
        if targets_u8.shape != images_u8.shape:
            raise ValueError(f"targets_u8 {tuple(targets_u8.shape)} and images_u8 "
                             f"{tuple(images_u8.shape)} differ in shape")
        self.targets = targets_u8.to(self.device).contiguous()

    def make_batch(self, idx: torch.Tensor, offset: int):
        noisy, _ = super().make_batch(idx, offset)
        return noisy, normalize_u8(self.targets.index_select(0, idx), noisy.dtype)
