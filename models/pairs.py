"""Training batches for the speckle-free target: (noisy speckled image, speckle-free map) pairs.

speckle_kernels.data.DeviceBatches makes (noisy, clean) from one uint8 set, the target being
the image itself. PairBatches is DeviceBatches with a second uint8 set of the same shape (the
speckle-free maps): each batch takes the same permutation indices in both, makes the input with
make_noisy_batch on the speckled images (the same noise counters DeviceBatches uses, so the
input of a batch is bit for bit the input DeviceBatches gives) and normalizes the maps as the
images are, (v / 255 - 0.5) / 0.5.
"""
from __future__ import annotations

import torch

from speckle_kernels.data import DeviceBatches
from speckle_kernels.noise import make_noisy_batch


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

    def batches(self, epoch: int = 0):
        # the loop of DeviceBatches.batches, with the same order and noise offsets
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        order = self.order(epoch).to(self.device)
        per_image = self.images[0].numel() if len(self.images) else 0
        global_batch = self.batch_size * self.world_size
        for b in range(len(self)):
            start = b * global_batch + self.rank * self.batch_size
            idx = order[start:start + self.batch_size]
            offset = (epoch * len(self) * global_batch + start) * per_image
            noisy, _ = make_noisy_batch(self.images.index_select(0, idx), seed=self.seed,
                                        offset=offset, **self.noise)
            yield noisy, normalize_u8(self.targets.index_select(0, idx), noisy.dtype)
