"""Norm-block benchmark cases: BatchRenorm -> LeakyReLU(0.1) -> Dropout(0.05) in training, at
Br-U-Net's (32, 64, 128, 128) (batch_renorm_cases.headline_cases: fp32/bf16, contiguous and
channels_last; on a CPU only fp32 contiguous at the real size, with --speckle-size full), each
implementation as one nn.Module in training mode:

    block-<backend>           FusedBatchRenormAct2d(C, dropout=0.05, backend=...): one pass
    renorm-<backend>-act-drop FusedBatchRenorm2d(backend=...) -> nn.LeakyReLU -> nn.Dropout
    bn2d-act-drop-eager       nn.BatchNorm2d -> nn.LeakyReLU -> nn.Dropout (torch's floor)
    bn2d-act-drop-compiled    torch.compile of the same Sequential
    reference                 FusedBatchRenormAct2d(backend="reference"): the plain-torch block

Bytes each call must move, counted as the batch_renorm group counts them (the floor of a
two-pass block that keeps no mask: the backward regenerates it from (seed, offset)):
    forward           3 tensors  (read x for the statistics; read x, write y)
    forward+backward  3 + 5      (backward: read x, dy for the sums; read x, dy again, write dx)
The compositions move more (y of each stage, a saved mask); that is the gap the block closes.

Setup checks, so that a fast wrong kernel fails: each block-<backend> row judges its backend
with the block kit (speckle_kernels/testing/batch_renorm_act.py: output, dx, dweight, dbias and buffers of
a one-step draw of the row's own input (its first 4 images on a CPU), against float64 on the run's own activation branches);
each renorm-<backend>-act-drop row checks its BatchRenorm as the batch_renorm group does; the
compiled Sequential is compared with the eager one on the elements its own mask kept (the two
draw different masks), a mismatch marked in the row (a baseline), not failed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from speckle_kernels.testing import batch_renorm as renorm_kit
from speckle_kernels.testing import batch_renorm_act as block_kit

from .batch_renorm_cases import (EPS, MOMENTUM, ULP, RenormState, check_renorm, headline_cases,
                                 renorm_impl)
from .common import KERNEL_BACKENDS, assert_close, assert_verdict, compile_fresh, probe_backend

SLOPE, DROPOUT = 0.1, 0.05           # Br-U-Net's LeakyReLU and dropout
BLOCK_IMPLS = (("reference",) + tuple(f"block-{b}" for b in KERNEL_BACKENDS)
               + ("bn2d-act-drop-eager", "bn2d-act-drop-compiled")
               + tuple(f"renorm-{b}-act-drop" for b in KERNEL_BACKENDS))
block_cases = headline_cases


def _block(channels: int, backend: str) -> nn.Module:
    from speckle_kernels import FusedBatchRenormAct2d

    return FusedBatchRenormAct2d(channels, eps=EPS, momentum=MOMENTUM, activation="leaky_relu",
                                 negative_slope=SLOPE, dropout=DROPOUT, backend=backend)


def probe_block_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise Unavailable unless the block's forward and backward run on `backend` here."""
    def call():
        x = torch.randn(2, 3, 4, 4, device=device).to(dtype).requires_grad_()
        _block(3, backend).to(device).train()(x).float().sum().backward()

    probe_backend(backend, device, call)


def _load_state(module: nn.Module, channels: int, device) -> nn.Module:
    """The renorm layers start from buffers where r and d clip for some channels."""
    s = RenormState(channels, device)
    with torch.no_grad():
        for name, value in (("running_mean", s.running_mean), ("running_std", s.running_std),
                            ("num_batches_tracked", s.num_batches_tracked)):
            getattr(module, name).copy_(value)
    return module


def block_impl(name: str, channels: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module of implementation `name` in training mode, or raise Unavailable."""
    from speckle_kernels import FusedBatchRenorm2d

    act_drop = [nn.LeakyReLU(SLOPE), nn.Dropout(DROPOUT)]
    if name == "reference":
        module = _load_state(_block(channels, "reference"), channels, device)
    elif name.startswith("block-"):
        probe_block_backend(name[len("block-"):], device, dtype)
        module = _load_state(_block(channels, name[len("block-"):]), channels, device)
    elif name.startswith("bn2d-act-drop-"):
        module = nn.Sequential(nn.BatchNorm2d(channels), *act_drop)
    elif name.startswith("renorm-") and name.endswith("-act-drop"):
        backend = name[len("renorm-"):-len("-act-drop")]
        renorm_impl(backend, device, dtype)  # Unavailable when this backend is missing
        norm = FusedBatchRenorm2d(channels, eps=EPS, momentum=MOMENTUM, backend=backend)
        module = nn.Sequential(_load_state(norm, channels, device), *act_drop)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    module = module.to(device).train()
    return compile_fresh(module) if name.endswith("-compiled") else module


def forward_backward(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One forward and backward: dx and the parameters' gradients (nothing accumulates)."""
    return torch.autograd.grad(module(x), (x, *module.parameters()), dy)


def _affine(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    norm = module if hasattr(module, "running_std") else module[0]
    return norm.weight, norm.bias


def check_block(name: str, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, device) -> str:
    """Check `module` (implementation `name`) on the row's input x; return the row's check note.
    Kernels raise AssertionError when wrong; the compiled baseline is marked, not failed."""
    if name == "reference":
        return "is the reference"
    if name == "bn2d-act-drop-eager":
        return "torch's own layers"
    if name.startswith("block-"):
        if device.type == "cpu":  # the float64 truth draws the mask through the torch Philox
            x, dy = x[:4], dy[:4]  # port (~1 min at batch 32): the first 4 images on a CPU
        s = RenormState(x.shape[1], device)
        weight, bias = _affine(module)
        d = renorm_kit.draw_from(x.detach(), dy, renorm_kit.State(
            s.running_mean, s.running_std, s.num_batches_tracked, weight.detach().clone(),
            bias.detach().clone()), training=True, momentum=MOMENTUM, eps=EPS)
        case = block_kit.BlockCase(d.case, activation="leaky_relu", negative_slope=SLOPE, dropout=DROPOUT)
        assert_verdict(block_kit.judge(name[len("block-"):], case, d))
        return "passed (block kit)"
    if name.startswith("renorm-"):
        backend = name[len("renorm-"):-len("-act-drop")]
        check_renorm(backend, renorm_impl(backend, device, x.dtype), x, backward=True, device=device)
        return "passed (renorm kit)"
    try:
        _check_against_eager(module, x, dy)
    except AssertionError as e:
        return f"FAILED: {e}"
    return "passed (vs eager on its kept elements)"


def _check_against_eager(compiled, x: torch.Tensor, dy: torch.Tensor) -> None:
    """torch.compile's Sequential against the eager one: y and every gradient where its own
    dropout mask kept the element (y != 0) and z is clear of the activation's kink, and a
    dropped fraction near p. The first call
    compiles; the eager twin starts from the same parameters and buffers."""
    eager = copy.deepcopy(getattr(compiled, "_orig_mod", compiled))
    xc = x.detach().clone().requires_grad_()
    xe = x.detach().clone().requires_grad_()
    yc = compiled(xc)
    kept = yc.detach() != 0
    dropped = 1 - kept.float().mean().item()
    if abs(dropped - DROPOUT) > 0.01 + 5 * (DROPOUT / kept.numel()) ** 0.5:
        raise AssertionError(f"dropped fraction {dropped:.4f}, p = {DROPOUT}")
    ze = eager[0](xe)
    ye = torch.where(kept, eager[1](ze) / (1 - DROPOUT), torch.zeros_like(xe))
    tol = ULP[x.dtype]
    # at the LeakyReLU's kink the two may round z to opposite signs (slopes 1 and 0.1): such
    # elements' dx are not compared
    clear = ze.detach().abs() > 8 * tol * ze.detach().abs().max()
    scale = ye.detach().abs().max().item()
    assert_close(yc, ye, atol=2 * tol * scale, rtol=2 * tol, name="compiled y")
    gc = torch.autograd.grad(yc, (xc, *compiled.parameters()), dy)
    ge = torch.autograd.grad(ye, (xe, *eager.parameters()), dy)
    assert_close(gc[0][clear], ge[0][clear], atol=4 * tol * ge[0].abs().max().item(), rtol=4 * tol,
                 name="compiled dx")
    # dweight and dbias sum N*H*W terms of size |dy| (|x_hat| + 1): bounded by their sum
    dims = [0] + list(range(2, x.dim()))
    terms = dy.double().abs().sum(dims).max().item() * 5
    for what, a, b in zip(("dweight", "dbias"), gc[1:], ge[1:]):
        assert_close(a, b, atol=4 * tol * terms, rtol=4 * tol, name=f"compiled {what}")
