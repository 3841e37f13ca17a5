"""BatchRenorm benchmark cases: Br-U-Net's norm shapes, the implementations side by side, and
the check each runs in its setup so that a fast wrong kernel fails.

The shapes are the inputs of Br-U-Net's norm layers, read from the model itself (forward
hooks on the meta device) at batch 32 and 128x128 images, one per level, plus the headline
(32, 64, 128, 128) where the targets are stated. Every level runs in fp32 contiguous; the
headline also runs in bf16 and channels_last (four combinations), which keeps the number of
torch.compile warm-ups (the slow part of a run) to nine per group.

Bytes each call must move (the floor of a two-pass kernel, counted as in ../shared/KERNEL-NOTES.md):
    forward           3 tensors  (read x for the statistics, read x + write y)
    forward+backward  3 + 5      (backward: read x, dy for the sums; read both again, write dx)
A kernel that takes its second read from a cache moves less to memory and can pass 100% of
copy: the C++ CPU kernel's per-channel schedule (csrc/cpu/batch_renorm_cpu.cpp) reads each
channel twice while it sits in the L2/L3, so x (and dy) come from memory once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speckle_kernels.testing import batch_renorm as renorm_kit

from .common import (BATCH, DTYPE_NAMES, IMAGE, KERNEL_BACKENDS, SMALL_BATCH, SMALL_IMAGE, assert_close,
                     assert_verdict, compile_fresh, probe_backend, tensor_bytes)

HEADLINE_CHANNELS = 64               # the (32, 64, 128, 128) of the targets
MOMENTUM, EPS = 0.01, 1e-3           # Br-U-Net's BatchRenorm
CHECK_T = 12000                      # num_batches_tracked for checks: r and d clip for some channels
ULP = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
RENORM_IMPLS = ("reference", "reference-compiled", "batchnorm2d", "triton", "cuda", "cpu")


def unet_norm_shapes(batch: int, image: int) -> list[tuple[int, ...]]:
    """Input shapes of Br-U-Net's norm layers, one per level, top level first (from the model)."""
    from speckle_models import br_unet

    with torch.device("meta"):
        model = br_unet(norm="batchnorm")  # the same shapes as the renorm layers; no kernels run
    seen: list[tuple[int, ...]] = []

    def hook(module, inputs):
        shape = tuple(inputs[0].shape)
        if shape not in seen:
            seen.append(shape)

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.empty(batch, 1, image, image, device="meta"))
    return sorted(seen, key=lambda s: -s[-1])


@dataclass(frozen=True)
class Case:
    level: str                   # "L0".."L4" or "headline"
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    full: bool                   # at its real size (False: scaled down)

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.level} {dims} {DTYPE_NAMES[self.dtype]} {self.layout}"

    @property
    def id(self) -> str:
        return self.label.replace(" ", "-")


def headline_cases(size: str, device: torch.device) -> list[Case]:
    """(32, 64, 128, 128) in fp32 and bf16, contiguous and channels_last. At size full on a
    GPU all four are at the real size; on a CPU only fp32 contiguous (the CPU target's case)."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            full = size == "full" and (device.type == "cuda" or (dtype == torch.float32 and not channels_last))
            b, hw = (BATCH, IMAGE) if full else (SMALL_BATCH, SMALL_IMAGE)
            cases.append(Case("headline", (b, HEADLINE_CHANNELS, hw, hw), dtype, channels_last, full))
    return cases


def renorm_cases(size: str, device: torch.device) -> list[Case]:
    full_levels = size == "full" and device.type == "cuda"
    batch, image = (BATCH, IMAGE) if full_levels else (SMALL_BATCH, SMALL_IMAGE)
    cases = [Case(f"L{i}", s, torch.float32, False, full_levels)
             for i, s in enumerate(unet_norm_shapes(batch, image))]
    return cases + headline_cases(size, device)


def renorm_input(shape, dtype, channels_last, device, seed=0) -> torch.Tensor:
    """Per-channel shifted and scaled normal data, as in tests/test_batch_renorm.py."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    scale = (torch.rand(c, generator=g, device=device) + 0.5).mul_(3).view(view)
    shift = torch.randn(c, generator=g, device=device).view(view)
    x = torch.randn(shape, generator=g, device=device).mul_(scale).add_(shift).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def renorm_bytes(shape, dtype, backward: bool) -> int:
    return (8 if backward else 3) * tensor_bytes(shape, dtype)



class RenormState:
    """Running buffers and affine parameters of one layer (fp32, as the modules keep them)."""

    def __init__(self, channels: int, device, t: int = CHECK_T, seed: int = 1, grad: bool = False):
        g = torch.Generator(device=device).manual_seed(seed)
        self.running_mean = torch.randn(channels, generator=g, device=device).mul_(0.7)
        self.running_std = torch.rand(channels, generator=g, device=device).mul_(2).add_(0.3)
        self.num_batches_tracked = torch.tensor(t, dtype=torch.long, device=device)
        self.weight = torch.randn(channels, generator=g, device=device).requires_grad_(grad)
        self.bias = torch.randn(channels, generator=g, device=device).requires_grad_(grad)

    def clone(self) -> "RenormState":
        other = object.__new__(RenormState)
        for k, v in vars(self).items():
            setattr(other, k, v.detach().clone().requires_grad_(v.requires_grad))
        return other

    def buffers(self):
        return self.running_mean, self.running_std, self.num_batches_tracked


def _reference_fn(x, s: RenormState, training: bool = True):
    from speckle_kernels.reference import batch_renorm_reference

    return batch_renorm_reference(x, *s.buffers(), s.weight, s.bias, training=training,
                                  momentum=MOMENTUM, eps=EPS)


def probe_kernel_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise Unavailable when the BatchRenorm `backend` cannot run here (common.probe_backend)."""
    import speckle_kernels as sk

    def call():
        s = RenormState(3, device)
        sk.batch_renorm(torch.randn(2, 3, 4, 4, device=device).to(dtype), *s.buffers(),
                        s.weight, s.bias, training=True, backend=backend)

    probe_backend(backend, device, call)


def renorm_impl(name: str, device: torch.device, dtype: torch.dtype, *, bn_eps: float = 1e-5,
                training: bool = True):
    """A function f(x, state) -> y for implementation `name`, or raise Unavailable.

    batchnorm2d is nn.BatchNorm2d's function (F.batch_norm with the state's buffers as its
    running mean and variance): a different layer, timed as the floor a renorm layer should reach.
    """
    if name in ("reference", "reference-compiled"):
        def reference(x, s):
            return _reference_fn(x, s, training)
        return compile_fresh(reference) if name == "reference-compiled" else reference
    if name == "batchnorm2d":
        def bn(x, s):
            return F.batch_norm(x, s.running_mean, s.running_std, s.weight, s.bias, training,
                                MOMENTUM, bn_eps)
        return bn
    if name in KERNEL_BACKENDS:
        probe_kernel_backend(name, device, dtype)
        import speckle_kernels as sk

        def kernel(x, s):
            return sk.batch_renorm(x, *s.buffers(), s.weight, s.bias, training=training,
                                   momentum=MOMENTUM, eps=EPS, backend=name)
        return kernel
    raise ValueError(f"unknown implementation {name!r}")


def check_renorm(name: str, fn, x: torch.Tensor, *, backward: bool, device, training: bool = True):
    """Fail unless fn computes BatchRenorm on x. The kernels are judged by the tests' kit
    (speckle_kernels/testing/batch_renorm.py): output, running buffers, dx, dweight and dbias against the
    same function in float64, at most 2x the fp32 reference's error + 1 ulp. The baselines are
    compared with the reference: torch.compile of it to the fp32 tolerances (1e-5 relative; the
    dtype's ulp in half precision), nn.BatchNorm2d where both are the same function (t = 0:
    r_max = 1, d_max = 0; eps 0 in the reference, 1e-12 in F.batch_norm, which refuses 0).
    """
    if name == "reference":
        return
    c = x.shape[1]
    g = torch.Generator(device=device).manual_seed(7)
    dy = torch.randn(x.shape, generator=g, device=device).to(x.dtype)
    if name in KERNEL_BACKENDS:
        s = RenormState(c, device)
        d = renorm_kit.draw_from(x.detach(), dy, renorm_kit.State(
            s.running_mean, s.running_std, s.num_batches_tracked, s.weight.detach(), s.bias.detach()),
            training=training, momentum=MOMENTUM, eps=EPS)
        assert_verdict(renorm_kit.judge(name, d))
        return
    plain_bn = name == "batchnorm2d"
    if plain_bn and not training:
        raise ValueError("batchnorm2d keeps a running variance: only its training mode compares")
    s_k = RenormState(c, device, t=0 if plain_bn else CHECK_T, grad=backward)
    if plain_bn:
        s_k.running_std.fill_(1.0)  # as a variance and as a std: 1 either way
        fn = renorm_impl(name, device, x.dtype, bn_eps=1e-12)
    s_r = s_k.clone()
    state = s_r.clone()  # the values this step starts from, for the tolerances below
    xk = x.detach().clone().requires_grad_(backward)
    xr = x.detach().clone().requires_grad_(backward)
    from speckle_kernels.reference import batch_renorm_reference

    with torch.set_grad_enabled(backward):  # the grad mode the benchmark times (one compile)
        yk = fn(xk, s_k)
        yr = batch_renorm_reference(xr, *s_r.buffers(), s_r.weight, s_r.bias, training=training,
                                    momentum=MOMENTUM, eps=0.0 if plain_bn else EPS)
    tol = ULP[x.dtype]
    if yk.dtype != x.dtype:
        raise AssertionError(f"{name}: output dtype {yk.dtype}, input {x.dtype}")
    assert_close(yk, yr, atol=tol * (yr.detach().abs().max().item() + 1e-30), rtol=tol, name=f"{name} y")
    if not plain_bn:  # BN keeps a running variance, not a std: its buffers are not comparable
        for what, a, b in zip(("running_mean", "running_std"), s_k.buffers(), s_r.buffers()):
            assert_close(a, b, atol=1e-6 * (b.abs().max().item() + 1), rtol=1e-5, name=f"{name} {what}")
    if not backward:
        return
    gk = torch.autograd.grad(yk, (xk, s_k.weight, s_k.bias), dy)
    gr = torch.autograd.grad(yr, (xr, s_r.weight, s_r.bias), dy)
    # dx cancels terms of size |A*dy|, A = w*r/sigma: the error scales with them.
    dims = [0] + list(range(2, x.dim()))
    sigma = x.double().std(dims, unbiased=False) + EPS
    a_max = state.weight.detach().abs().max().item() * max(
        3.0 / sigma.min().item() if training else 0.0, 1.0 / state.running_std.min().item())
    assert_close(gk[0], gr[0], atol=tol * dy.abs().max().item() * a_max, rtol=tol, name=f"{name} dx")
    view = [1, c] + [1] * (x.dim() - 2)
    xhat = (yr.detach().double() - state.bias.detach().double().view(view)) / state.weight.detach().double().view(view)
    dyd = dy.double()
    w_scale = (dyd * xhat).abs().sum(dims) + dyd.abs().sum(dims)
    b_scale = dyd.abs().sum(dims)
    # PyTorch's own BatchNorm on CPU sums bf16 channels_last gradients less precisely than fp32:
    # the baselines are held to their dtype's precision.
    rel = max(1e-5, ULP[x.dtype])
    for what, a, b, bound in (("dweight", gk[1], gr[1], w_scale), ("dbias", gk[2], gr[2], b_scale)):
        diff = (a.double() - b.double()).abs()
        if not (diff <= rel * bound + 1e-7).all():
            raise AssertionError(f"{name} {what}: max diff {diff.max().item():.3g} over a bound "
                                 f"of {rel:.3g} x sum|terms| (min {bound.min().item():.3g})")


def forward_backward(fn, x, state, dy):
    """One forward and backward: dx, dweight, dbias (autograd.grad: nothing accumulates)."""
    y = fn(x, state)
    return torch.autograd.grad(y, (x, state.weight, state.bias), dy)
