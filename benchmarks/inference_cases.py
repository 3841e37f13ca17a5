"""Inference benchmark cases: frames/s of each network (speckle-denoise's forward pass) on each
inference path (models/inference/engine.py) at the paper's size and two real frame sizes.

    shapes (H x W)    128x128 (the paper), 420x580 (a Kaggle frame), 480x640 (a scanner frame)
    eager             the network in eval mode as load_denoiser gives it: fp32, NCHW (the judge)
    folded            fold_norms: eval norms folded into the convolutions (models/networks/fold.py)
    folded_cl         folded + channels_last: speckle-denoise's eager fp32 path
    bf16              folded + channels_last + bf16 autocast (the default where bf16 is native)
    compiled          folded + channels_last, torch.compile (Inductor, frozen weights)
    int8              PT2E int8 (x86 Inductor quantizer, calibrated on the row's input), compiled

Each row records GFLOP a frame (torch.utils.flop_counter on the eager network), the achieved
GFLOP/s, and its fraction of this device's matmul peak measured in the same session with
torch.matmul (benchmarks.common.matmul_peak): bf16 rows against the bf16 peak, int8 rows
against the int8 one (torch._int_mm) where it runs, the rest against fp32.

Sizes: full is the paper's width 32, batch 8 on a GPU and batch 1 on a CPU (one frame at a
time, as a scanner delivers them); small (the CPU default, CI) is the quick preset's width 16
at batch 1, and compiles (compiled, int8) only Br-U-Net at 128x128: Inductor takes ~30 s per
graph on a shared 2-core CPU; a CPU without native bf16 runs the bf16 rows at 128x128 only (an
emulated bf16 is slower than fp32: the row shows it, more rows would only cost time). The other
rows skip with that reason.

Weights are random (seeded) with non-trivial eval norms (scale, shift, running statistics),
so a fold that dropped or misplaced a norm shows. Check, once per row before timing: fp32 rows
against eager's output, max |impl - eager| <= 1e-4 * max |eager| (folding and Inductor's
fusions change fp32 results by ~1e-6 of that, tests/test_fold_export.py); bf16 and int8 rows
by the issue's bar: >= 99 % of 8-bit output pixels within one grey level of eager fp32
(engine.agreement). On a GPU the check runs with TF32 convolutions off (cudnn.allow_tf32, on by
default), so the fp32 bound applies there too; the timed calls run with the defaults a user gets.
"""
from __future__ import annotations

import functools
import math

import torch

from .common import assert_close

INFER_IMPLS = ("eager", "folded", "folded_cl", "bf16", "compiled", "int8")
COMPILED_IMPLS = ("compiled", "int8")
LOW_PRECISION = {"bf16": "bf16", "int8": "int8"}  # impl -> the peak its rate is measured against
INFER_SHAPES = {"128x128": (128, 128), "kaggle-420x580": (420, 580), "scanner-480x640": (480, 640)}
CHECK_RTOL = 1e-4


def infer_setup(size: str, device: torch.device) -> tuple[int, int]:
    """(batch, width) of the inference rows."""
    if size == "full":
        return (8 if device.type == "cuda" else 1), 32
    return 1, 16


def skip_reason(impl: str, network: str, shape: str, size: str, device: torch.device) -> str | None:
    if impl in COMPILED_IMPLS and device.type == "cpu" and size == "small" \
            and (network, shape) != ("br-unet", "128x128"):
        return ("compiled rows on a CPU at small size: Br-U-Net 128x128 only (Inductor takes "
                "~30 s per graph here); SPECKLE_BENCH_SIZE=full runs them all")
    if impl == "int8" and device.type != "cpu":
        return "int8 (the x86 Inductor quantizer) runs on the CPU only"
    if impl == "bf16" and device.type == "cpu" and shape != "128x128":
        from speckle_models.inference.engine import native_bf16
        native, why = native_bf16(device)
        if not native:
            return f"bf16 at 128x128 only here: {why}"
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


def infer_impl(impl: str, model: torch.nn.Module, x: torch.Tensor):
    """A no-grad forward function of implementation `impl` (the engine's paths; compiled and
    int8 rows compile, and int8 calibrates on x, here)."""
    from speckle_models.inference.engine import Engine, choose_path

    if impl == "eager":
        def forward(batch):
            with torch.no_grad():
                return model(batch)
        return forward
    options = {"folded": dict(channels_last=False), "folded_cl": {}, "bf16": dict(precision="bf16"),
               "compiled": dict(compile=True), "int8": dict(precision="int8", compile=True)}
    if impl not in options:
        raise ValueError(f"unknown implementation {impl!r}")
    kw = dict(precision="fp32", compile=False, cuda_graph=False)
    kw.update(options[impl])
    engine = Engine(model, choose_path(x.device, **kw), check=False)
    engine.first_batch(x)
    return engine


def check_inference(impl: str, fn, x: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 rows: max |fn(x) - eager| <= 1e-4 * max |eager| with IEEE fp32 convolutions; bf16
    and int8 rows: engine.agreement >= AGREEMENT_BAR (module docstring)."""
    from speckle_models.inference.engine import AGREEMENT_BAR, agreement

    if impl == "eager":
        return
    with _ieee_fp32():
        got = fn(x)
    if impl in LOW_PRECISION:
        share = agreement(got, expected)
        if share < AGREEMENT_BAR:
            raise AssertionError(f"inference {impl}: {share:.4f} of 8-bit pixels within one grey level "
                                 f"of eager fp32 (bar {AGREEMENT_BAR})")
        return
    scale = expected.abs().max().item()
    if not math.isfinite(scale) or scale == 0:
        raise AssertionError(f"{impl}: the eager output is degenerate (max |y| = {scale})")
    assert_close(got.float(), expected.float(), atol=CHECK_RTOL * scale, rtol=0.0,
                 name=f"inference {impl}")


@functools.lru_cache(maxsize=8)
def frame_gflop(network: str, shape: str, size: str, device_name: str) -> float:
    """GFLOP of one frame's eager forward (torch.utils.flop_counter)."""
    from speckle_models.networks.flops import forward_flops

    model, x, _ = infer_case(network, shape, size, device_name)
    return forward_flops(model, x[:1]) / 1e9
