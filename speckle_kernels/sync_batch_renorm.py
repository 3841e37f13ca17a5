"""Batch renormalization with statistics synchronized across processes, and model converters.

Like nn.SyncBatchNorm for BatchNorm: each rank computes its per-channel count, mean and M2
(sum of squared deviations) in fp32, one all_gather brings every rank's triple, and Chan's
formula merges them (stable where E[x^2]-E[x]^2 would cancel). r, d and the running statistics
then follow the single-process rules, identically on every rank. The backward all-reduces the
two per-channel sums (sum dy, sum dy*z) once, so dx equals that of one process holding the whole
batch; weight and bias gradients stay local, as DistributedDataParallel averages them itself.

This path is written with torch ops (no fused kernel): the collectives dominate at the scale
where synchronization is worth it. Without an initialized process group, or with one rank, the
layer runs the ordinary FusedBatchRenorm path. Under activation checkpointing both paths replay
their forward's buffers in the recompute (layers.running_buffers, checkpoint_replay.py); the
recompute's all_gather runs on every rank alike, as its forward's did.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .batch_renorm_act import batch_renorm_act
from .layers import (FusedBatchRenorm1d, FusedBatchRenorm2d, FusedBatchRenorm3d, _FusedBatchRenorm,
                     _FusedBatchRenormAct)
from .batch_renorm_act_contract import check_block_args
from .schedules import renorm_correction, update_running_stats


class _SyncBatchRenormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_std, num_batches_tracked,
                momentum, eps, r_max, d_max, group):
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((x.shape[1],), x.numel() / x.shape[1], device=x.device)
        var, mean = torch.var_mean(xf, dims, unbiased=False)
        local = torch.stack([count, mean, var * count])  # (3, C)
        world = dist.get_world_size(group)
        gathered = torch.empty((world * 3, x.shape[1]), device=x.device, dtype=local.dtype)
        # all_gather_single replaces all_gather_into_tensor in newer torch; same collective
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(gathered, local.contiguous(), group=group)
        counts, means, m2s = gathered.view(world, 3, -1).unbind(1)  # each (world, C)
        total = counts.sum(0)
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        std_biased = (m2 / total).clamp_min(0.0).sqrt()  # no autograd here: the backward is below
        std = std_biased + eps
        r, d = renorm_correction(mean, std, running_mean, running_std, num_batches_tracked, r_max, d_max)
        update_running_stats(mean, std, running_mean, running_std, num_batches_tracked, momentum)
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        z = (xf - mean.view(shape)) / std.view(shape)
        xhat = z * r.view(shape) + d.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        inv_s = torch.where(std_biased > 0, 1 / torch.where(std_biased > 0, std_biased, 1), 0)
        ctx.save_for_backward(x, weight, mean, std, inv_s, r, d, total)
        ctx.group, ctx.has_bias = group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, std, inv_s, r, d, total = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        dyf = dy.float()
        z = (x.float() - mean.view(shape)) / std.view(shape)
        local_sums = torch.stack([dyf.sum(dims), (dyf * z).sum(dims)])
        global_sums = local_sums.clone()
        dist.all_reduce(global_sums, group=ctx.group)
        sum_dy, sum_dyz = global_sums
        w = weight.float() if weight is not None else torch.ones_like(mean)
        coef_a = w * r / std
        coef_b = -coef_a * sum_dyz * inv_s / total
        coef_0 = -coef_a * sum_dy / total
        dx = (dyf * coef_a.view(shape) + (x.float() - mean.view(shape)) * coef_b.view(shape)
              + coef_0.view(shape)).to(x.dtype)
        local_dy, local_dyz = local_sums
        dweight = (r * local_dyz + d * local_dy).to(weight.dtype) if weight is not None else None
        dbias = local_dy.to(weight.dtype if weight is not None else dy.dtype) if ctx.has_bias else None
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


class SyncFusedBatchRenorm(_FusedBatchRenorm):
    """FusedBatchRenorm whose training statistics are merged across the ranks of `process_group`.

    Accepts (N, C, ...) input of any rank >= 2, like nn.SyncBatchNorm.
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01, affine: bool = True,
                 *, process_group=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, **kwargs)
        self.process_group = process_group

    def _synchronizing(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronizing():
            return super().forward(x)
        self._check_input_dim(x)
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty input, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
        return _SyncBatchRenormFunction.apply(
            x, self.weight, self.bias, *self.running_buffers(), self.momentum, self.eps, self.r_max, self.d_max, self.process_group)


class SyncFusedBatchRenormAct(SyncFusedBatchRenorm):
    """The synchronized layer followed by the block's activation (what convert_sync_batchrenorm
    makes of a FusedBatchRenormAct*d without dropout); same parameters and buffers."""

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01, affine: bool = True,
                 *, activation: str = "leaky_relu", negative_slope: float = 0.1, **kwargs):
        super().__init__(num_features, eps, momentum, affine, **kwargs)
        check_block_args(activation, negative_slope, 0.0)
        self.activation, self.negative_slope = activation, float(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synchronizing():  # one process: the fused block itself
            self._check_input_dim(x)
            return batch_renorm_act(
                x, *self.running_buffers(), self.weight, self.bias,
                training=self.training, momentum=self.momentum, eps=self.eps, r_max=self.r_max,
                d_max=self.d_max, activation=self.activation, negative_slope=self.negative_slope,
                backend=self.backend)
        y = super().forward(x)
        if self.activation == "relu":
            return F.relu(y)
        return F.leaky_relu(y, self.negative_slope) if self.activation == "leaky_relu" else y


def _copy_renorm(src: nn.Module, dst: _FusedBatchRenorm) -> _FusedBatchRenorm:
    with torch.no_grad():
        dst.running_mean.copy_(src.running_mean)
        dst.running_std.copy_(src.running_std)
        dst.num_batches_tracked.copy_(src.num_batches_tracked)
        if dst.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return dst.to(device=src.running_mean.device)


def convert_sync_batchrenorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every FusedBatchRenorm in `module` by a SyncFusedBatchRenorm with the same state."""
    if isinstance(module, _FusedBatchRenorm) and not isinstance(module, SyncFusedBatchRenorm):
        kwargs = dict(r_max=module.r_max, d_max=module.d_max, backend=module.backend,
                      process_group=process_group)
        if isinstance(module, _FusedBatchRenormAct):
            if module.dropout > 0:
                raise ValueError(f"cannot synchronize {type(module).__name__} with dropout="
                                 f"{module.dropout}: the synchronized layer has no fused dropout; "
                                 "use a separate dropout layer")
            new = SyncFusedBatchRenormAct(module.num_features, module.eps, module.momentum, module.affine,
                                          activation=module.activation,
                                          negative_slope=module.negative_slope, **kwargs)
        else:
            new = SyncFusedBatchRenorm(module.num_features, module.eps, module.momentum, module.affine,
                                       **kwargs)
        new.train(module.training)
        return _copy_renorm(module, new)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchrenorm(child, process_group))
    return module


_FUSED_BY_RANK = {1: FusedBatchRenorm1d, 2: FusedBatchRenorm2d, 3: FusedBatchRenorm3d}
_THIRD_PARTY_NAMES = {"BatchRenorm1d": 1, "BatchRenorm2d": 2, "BatchRenorm3d": 3}
_BATCHNORM_TYPES = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def convert_batchrenorm(module: nn.Module, *, batchnorm: bool = False, backend: str = "auto") -> nn.Module:
    """Swap the third-party BatchRenorm1d/2d/3d modules (github.com/ludvb/batchrenorm) in `module`
    for FusedBatchRenorm, keeping weights and buffers. With batchnorm=True, nn.BatchNorm1d/2d/3d
    become FusedBatchRenorm too: running_std = sqrt(running_var + eps), and BatchNorm's eps is
    kept (BatchNorm adds it to the variance, BatchRenorm to the std, so outputs differ slightly)."""
    kind = type(module).__name__
    if kind in _THIRD_PARTY_NAMES and hasattr(module, "running_std"):
        num_features = module.running_mean.numel()
        new = _FUSED_BY_RANK[_THIRD_PARTY_NAMES[kind]](
            num_features, module.eps, module.momentum, module.affine, backend=backend)
        new.train(module.training)
        return _copy_renorm(module, new)
    if batchnorm and type(module) in _BATCHNORM_TYPES and module.track_running_stats:
        new = _FUSED_BY_RANK[_BATCHNORM_TYPES[type(module)]](
            module.num_features, module.eps, module.momentum if module.momentum is not None else 0.1,
            module.affine, backend=backend)
        new.train(module.training)
        with torch.no_grad():
            new.running_mean.copy_(module.running_mean)
            new.running_std.copy_((module.running_var + module.eps).sqrt())
            new.num_batches_tracked.copy_(module.num_batches_tracked)
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        return new.to(device=module.running_mean.device)
    for name, child in module.named_children():
        module.add_module(name, convert_batchrenorm(child, batchnorm=batchnorm, backend=backend))
    return module
