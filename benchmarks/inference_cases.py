"""Inference benchmark cases: images/s of each network (speckle-denoise's forward pass) at the
paper's size and two real frame sizes, eager against folded norms and torch.compile.

    shapes (H x W)    128x128 (the paper), 420x580 (a Kaggle frame), 480x640 (a scanner frame)
    eager             the network in eval mode, as load_denoiser gives it
    folded            fold_norms: eval norms folded into the convolutions (models/networks/fold.py)
    compiled          torch.compile(dynamic=False) of the folded copy (the deployment path)

Sizes: full is the paper's width 32, batch 8 on a GPU and batch 1 on a CPU (one frame at a
time, as a scanner delivers them); small (the CPU default, CI) is the quick preset's width 16
at batch 1, and compiles only Br-U-Net at 128x128: Inductor takes ~30 s per graph on a shared
2-core CPU, so nine compiled rows would be minutes; the other compiled rows skip with that
reason. A CPU small row is then five forward passes (check, one warm-up round, three timed),
and the group ran in ~2 minutes on a shared, busy 2-core machine (~1 minute of CPU time).

Weights are random (seeded) with non-trivial eval norms (scale, shift, running statistics),
so a fold that dropped or misplaced a norm shows. Check, once per row before timing: the
output against eager's, max |impl - eager| <= 1e-4 * max |eager|; folding and Inductor's
fusions change fp32 results by ~1e-6 of that (tests/test_fold_export.py). On a GPU the check
runs with TF32 convolutions off (cudnn.allow_tf32, on by default), so that bound applies
there too; the timed calls run with the defaults a user gets.
"""
from __future__ import annotations

import functools
import math

import torch

from .common import assert_close, compile_fresh

INFER_IMPLS = ("eager", "folded", "compiled")
INFER_SHAPES = {"128x128": (128, 128), "kaggle-420x580": (420, 580), "scanner-480x640": (480, 640)}
CHECK_RTOL = 1e-4


def infer_setup(size: str, device: torch.device) -> tuple[int, int]:
    """(batch, width) of the inference rows."""
    if size == "full":
        return (8 if device.type == "cuda" else 1), 32
    return 1, 16


def skip_reason(impl: str, network: str, shape: str, size: str, device: torch.device) -> str | None:
    if impl == "compiled" and device.type == "cpu" and size == "small" \
            and (network, shape) != ("br-unet", "128x128"):
        return ("compiled rows on a CPU at small size: Br-U-Net 128x128 only (Inductor takes "
                "~30 s per graph here); SPECKLE_BENCH_SIZE=full runs them all")
    return None


def infer_network(name: str, width: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A network in eval mode with seeded random weights and non-trivial eval norms."""
    from speckle_models import build_model
    from speckle_models.networks.fold import norm_modules

    torch.manual_seed(seed)
    model = build_model(name, width=width)
    with torch.no_grad():
        for _, norm in norm_modules(model):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.2)
            norm.running_mean.normal_(0.0, 0.2)
            (norm.running_var if hasattr(norm, "running_var") else norm.running_std).uniform_(0.5, 2.0)
    return model.eval().to(device)


def infer_input(batch: int, h: int, w: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Speckled images normalized as in training: a smooth map times Rayleigh speckle, in
    [-1, 1]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(batch, 1, h, w, generator=g), 9, 1, 4)
    speckle = torch.sqrt(-2 * torch.log1p(-torch.rand(batch, 1, h, w, generator=g) * 0.999))
    v = (0.6 * smooth * speckle).clamp(0, 1)
    return ((v - 0.5) / 0.5).to(device)


@functools.lru_cache(maxsize=2)
def infer_case(network: str, shape: str, size: str, device_name: str):
    """(model, input, eager output under IEEE fp32 convolutions) of one network and shape."""
    device = torch.device(device_name)
    batch, width = infer_setup(size, device)
    h, w = INFER_SHAPES[shape]
    model = infer_network(network, width, device)
    x = infer_input(batch, h, w, device)
    with torch.no_grad(), _ieee_fp32():
        expected = model(x)
    return model, x, expected


def _ieee_fp32():
    """cuDNN's flags as they are, TF32 off (flags() sets every flag it takes, then restores)."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                       deterministic=cudnn.deterministic, allow_tf32=False)


def infer_impl(impl: str, model: torch.nn.Module):
    """A no-grad forward function of implementation `impl`."""
    from speckle_models.networks.fold import fold_norms

    if impl == "eager":
        net = model
    elif impl == "folded":
        net = fold_norms(model)
    elif impl == "compiled":
        net = compile_fresh(fold_norms(model))
    else:
        raise ValueError(f"unknown implementation {impl!r}")

    def forward(x):
        with torch.no_grad():
            return net(x)
    return forward


def check_inference(impl: str, fn, x: torch.Tensor, expected: torch.Tensor) -> None:
    """max |fn(x) - eager| <= 1e-4 * max |eager| with IEEE fp32 convolutions (module docstring)."""
    if impl == "eager":
        return
    with _ieee_fp32():
        got = fn(x)
    scale = expected.abs().max().item()
    if not math.isfinite(scale) or scale == 0:
        raise AssertionError(f"{impl}: the eager output is degenerate (max |y| = {scale})")
    assert_close(got.float(), expected.float(), atol=CHECK_RTOL * scale, rtol=0.0,
                 name=f"inference {impl}")
