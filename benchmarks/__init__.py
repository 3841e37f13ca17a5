"""What the benchmarks and gpu_check.py share: cases, implementations, checks, bytes, copy speed.

Nothing here imports pytest, so `python -m benchmarks.gpu_check` runs without it.

Cases. The BatchRenorm shapes are the inputs of Br-U-Net's norm layers, read from the model
itself (forward hooks on the meta device) at batch 32 and 128x128 images, one per level, plus
the headline (32, 64, 128, 128) where issue 5 states its targets. Every level runs in fp32
contiguous; the headline also runs in bf16 and channels_last (four combinations), which keeps
the number of torch.compile warm-ups (the slow part of a run) to nine per group.

Sizes (SPECKLE_BENCH_SIZE, or pytest's --speckle-size):
    full   GPU default: every case at its real size.  On a CPU only the fp32 contiguous
           headline runs at its real size, the rest stays small, so the run stays minutes long.
    small  CPU default (and CI): batch 4, 64x64 images; a few rounds.

Bytes each call must move (the floor of a two-pass kernel, counted as in KERNEL-NOTES.md):
    BatchRenorm forward           3 tensors  (read x for the statistics, read x + write y)
    BatchRenorm forward+backward  3 + 5      (backward: read x, dy for the sums; read both
                                              again and write dx)
    A kernel that takes its second read from a cache moves less to memory and can pass 100%
    of copy: the C++ CPU kernel's per-channel schedule (csrc/cpu/batch_renorm_cpu.cpp) reads
    each channel twice while it sits in the L2/L3, so x (and dy) come from memory once.
    batch maker                   uint8 read + two writes of the output dtype
    add_speckle_noise             read x + write y
    SSIM                          read both images once
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZES = ("small", "full")
BATCH, IMAGE = 32, 128               # the paper's batch and image size
SMALL_BATCH, SMALL_IMAGE = 4, 64
HEADLINE_CHANNELS = 64               # issue 5's (32, 64, 128, 128)
MOMENTUM, EPS = 0.01, 1e-3           # Br-U-Net's BatchRenorm
CHECK_T = 12000                      # num_batches_tracked for checks: r and d clip for some channels
ULP = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # tests/test_batch_renorm.py
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Implementations, in the order tables list them. The first of each group is its reference.
RENORM_IMPLS = ("reference", "reference-compiled", "batchnorm2d", "triton", "cuda", "cpu")
NOISE_IMPLS = ("reference", "reference-compiled", "triton", "cuda", "cpu")
SSIM_IMPLS = ("skimage", "ssim-fp64", "ssim-fp32", "ssim-fp32-compiled")
TRAIN_IMPLS = ("br-unet-reference", "br-unet-triton", "br-unet-cuda", "br-unet-cpu", "d-unet-batchnorm2d")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")


class Unavailable(Exception):
    """An implementation that is not present here; the benchmark is skipped with this reason."""


# ----------------------------------------------------------------------------- device and size

def bench_device() -> torch.device:
    name = os.environ.get("SPECKLE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_size(device: torch.device) -> str:
    size = os.environ.get("SPECKLE_BENCH_SIZE") or ("full" if device.type == "cuda" else "small")
    if size not in SIZES:
        raise ValueError(f"SPECKLE_BENCH_SIZE must be one of {SIZES}, got {size!r}")
    return size


def rounds_for(size: str, device: torch.device) -> tuple[int, int]:
    """(rounds, warm-up rounds) for pedantic timing; one iteration a round."""
    if device.type == "cuda":
        return (50, 10) if size == "full" else (20, 5)
    # full size on a shared 2-core CPU: 7 rounds left medians that moved by 30% between runs
    return (15, 3) if size == "full" else (3, 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- cases

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


def renorm_cases(size: str, device: torch.device) -> list[Case]:
    full_levels = size == "full" and device.type == "cuda"
    full_headline = size == "full"
    batch, image = (BATCH, IMAGE) if full_levels else (SMALL_BATCH, SMALL_IMAGE)
    cases = [Case(f"L{i}", s, torch.float32, False, full_levels)
             for i, s in enumerate(unet_norm_shapes(batch, image))]
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            full = full_levels or (full_headline and dtype == torch.float32 and not channels_last)
            b, hw = (BATCH, IMAGE) if full else (SMALL_BATCH, SMALL_IMAGE)
            cases.append(Case("headline", (b, HEADLINE_CHANNELS, hw, hw), dtype, channels_last, full))
    return cases


def renorm_input(shape, dtype, channels_last, device, seed=0) -> torch.Tensor:
    """Per-channel shifted and scaled normal data, as in tests/test_batch_renorm.py."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    scale = (torch.rand(c, generator=g, device=device) + 0.5).mul_(3).view(view)
    shift = torch.randn(c, generator=g, device=device).view(view)
    x = torch.randn(shape, generator=g, device=device).mul_(scale).add_(shift).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rotation_count(tensor_bytes: int, device: torch.device) -> int:
    """Input buffers to cycle through so each call reads memory, not a warm cache: the GPU's
    L2 is 50-60 MB (a bf16 (32, 32, 128, 128) tensor fits), a CPU's last-level cache less."""
    cold = (256 if device.type == "cuda" else 64) * 2**20
    return max(1, min(16, math.ceil(cold / max(tensor_bytes, 1))))


# ----------------------------------------------------------------------------- bytes

def tensor_bytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def renorm_bytes(shape, dtype, backward: bool) -> int:
    return (8 if backward else 3) * tensor_bytes(shape, dtype)


def batch_maker_bytes(shape, out_dtype) -> int:
    return tensor_bytes(shape, torch.uint8) + 2 * tensor_bytes(shape, out_dtype)


# ----------------------------------------------------------------------------- copy bandwidth

def time_calls(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per call of fn(), each call timed alone: CUDA events on a GPU, else the clock."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> dict:
    """Median GB/s of dst.copy_(src) (read + write counted) on a tensor far beyond the caches."""
    if nbytes is None:
        nbytes = (1024 if device.type == "cuda" else 256) * 2**20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    median = statistics.median(time_calls(lambda: dst.copy_(src), device, reps, warmup=2))
    return {"bytes": 2 * nbytes, "median_s": median, "gbps": 2 * nbytes / median / 1e9}


# ----------------------------------------------------------------------------- BatchRenorm

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


def _compile(fn):
    """torch.compile with fresh caches: each benchmark warms its own graph, and a hit on the
    recompile limit raises instead of falling back to eager without a word."""
    import torch._dynamo

    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


def probe_kernel_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise Unavailable when `backend` cannot run here: asked for by name, it raises rather
    than fall back, which is what tells a missing implementation from a present one."""
    if backend == "triton" and device.type != "cuda":
        raise Unavailable("Triton runs on CPU tensors only under its interpreter, which is not a speed")
    import speckle_kernels as sk

    s = RenormState(3, device)
    try:
        sk.batch_renorm(torch.randn(2, 3, 4, 4, device=device).to(dtype), *s.buffers(),
                        s.weight, s.bias, training=True, backend=backend)
    except (RuntimeError, TypeError, ImportError) as e:
        raise Unavailable(f"backend={backend!r} is not available here: {e}") from e


def renorm_impl(name: str, device: torch.device, dtype: torch.dtype, *, bn_eps: float = 1e-5,
                training: bool = True):
    """A function f(x, state) -> y for implementation `name`, or raise Unavailable.

    batchnorm2d is nn.BatchNorm2d's function (F.batch_norm with the state's buffers as its
    running mean and variance): a different layer, timed as the floor a renorm layer should reach.
    """
    if name in ("reference", "reference-compiled"):
        def reference(x, s):
            return _reference_fn(x, s, training)
        return _compile(reference) if name == "reference-compiled" else reference
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


def _close(actual, expected, *, atol, rtol, name):
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} differ (atol={atol:.3g}, rtol={rtol:.3g}, "
            f"max abs diff {diff.max().item():.3g}; at {first}: got {actual[first].item():.8g}, "
            f"expected {expected[first].item():.8g})")


def check_renorm(name: str, fn, x: torch.Tensor, *, backward: bool, device, training: bool = True,
                 states=None):
    """Fail unless fn equals the reference on x: output (dtype, shape, layout), running buffers
    and, with backward, dx, dweight and dbias, to the tolerances of tests/test_batch_renorm.py.
    fn must have been made with the same `training`. Returns the (fn's, reference's) states;
    pass them back as `states` to check a further step from where this one left the buffers.

    batchnorm2d is compared with the reference at t = 0 (r_max = 1, d_max = 0: plain batch
    norm), eps 0 in the reference and 1e-12 in F.batch_norm (which refuses 0 in training): there
    the two layers compute the same function.
    """
    if name == "reference":
        return states
    plain_bn = name == "batchnorm2d"
    if plain_bn and not training:
        raise ValueError("batchnorm2d keeps a running variance: only its training mode compares")
    c = x.shape[1]
    if states is None:
        state = RenormState(c, device, t=0 if plain_bn else CHECK_T, grad=backward)
        if plain_bn:
            state.running_std.fill_(1.0)  # as a variance and as a std: 1 either way
        states = state.clone(), state.clone()
    if plain_bn:
        fn = renorm_impl(name, device, x.dtype, bn_eps=1e-12)
    s_k, s_r = states
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
    if name in KERNEL_BACKENDS and yk.stride() != x.stride():
        raise AssertionError(f"{name}: output strides {yk.stride()} differ from the input's {x.stride()}")
    _close(yk, yr, atol=tol * (yr.detach().abs().max().item() + 1e-30), rtol=tol, name=f"{name} y")
    if plain_bn:  # BN keeps a running variance, not a std: its buffers are not comparable
        pass
    else:
        for what, a, b in zip(("running_mean", "running_std"), s_k.buffers(), s_r.buffers()):
            _close(a, b, atol=1e-6 * (b.abs().max().item() + 1), rtol=1e-5, name=f"{name} {what}")
        if int(s_k.num_batches_tracked) != int(s_r.num_batches_tracked):
            raise AssertionError(f"{name}: num_batches_tracked not advanced like the reference")
    if not backward:
        return states
    g = torch.Generator(device=device).manual_seed(7)
    dy = torch.randn(x.shape, generator=g, device=device).to(x.dtype)
    gk = torch.autograd.grad(yk, (xk, s_k.weight, s_k.bias), dy)
    gr = torch.autograd.grad(yr, (xr, s_r.weight, s_r.bias), dy)
    # dx cancels terms of size |A*dy|, A = w*r/sigma: the error scales with them (as in the tests).
    dims = [0] + list(range(2, x.dim()))
    sigma = x.double().std(dims, unbiased=False) + EPS
    a_max = state.weight.detach().abs().max().item() * max(
        3.0 / sigma.min().item() if training else 0.0, 1.0 / state.running_std.min().item())
    _close(gk[0], gr[0], atol=tol * dy.abs().max().item() * a_max, rtol=tol, name=f"{name} dx")
    view = [1, c] + [1] * (x.dim() - 2)
    xhat = (yr.detach().double() - state.bias.detach().double().view(view)) / state.weight.detach().double().view(view)
    dyd = dy.double()
    w_scale = (dyd * xhat).abs().sum(dims) + dyd.abs().sum(dims)
    b_scale = dyd.abs().sum(dims)
    # Our kernels sum dweight and dbias in fp32 whatever the input dtype (the tests' 1e-5).
    # PyTorch's own BatchNorm on CPU sums bf16 channels_last gradients less precisely: the
    # baselines are held to their dtype's precision instead.
    rel = 1e-5 if name in KERNEL_BACKENDS else max(1e-5, ULP[x.dtype])
    for what, a, b, bound in (("dweight", gk[1], gr[1], w_scale), ("dbias", gk[2], gr[2], b_scale)):
        diff = (a.double() - b.double()).abs()
        if not (diff <= rel * bound + 1e-7).all():
            raise AssertionError(f"{name} {what}: max diff {diff.max().item():.3g} over a bound "
                                 f"of {rel:.3g} x sum|terms| (min {bound.min().item():.3g})")
    return states


def forward_backward(fn, x, state, dy):
    """One forward and backward: dx, dweight, dbias (autograd.grad: nothing accumulates)."""
    y = fn(x, state)
    return torch.autograd.grad(y, (x, state.weight, state.bias), dy)


# ----------------------------------------------------------------------------- speckle noise

# The paper's middle setting: factor 5 on sigma 0.1 (one sigma for all images, so the noisy
# values are independent draws and the compiled reference can be checked statistically).
NOISE_KW = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.02, distribution="gaussian", clip=True)


def noise_shapes(size: str, device: torch.device) -> list[tuple[int, ...]]:
    """(N, 1, H, W) uint8 batches: the paper's batch, and on a GPU at full size a large one
    where the kernel can reach the memory bound (a 32-image batch is latency-bound there)."""
    if size == "full" and device.type == "cuda":
        return [(BATCH, 1, IMAGE, IMAGE), (256, 1, 2 * IMAGE, 2 * IMAGE)]
    return [(BATCH if size == "full" else 8, 1, IMAGE, IMAGE)]


def noise_impl(name: str, op: str, device: torch.device):
    """f(x) for op "batch" (uint8 -> (noisy, clean)) or "add" (float x -> y); or Unavailable."""
    from speckle_kernels import noise as N
    from speckle_kernels.reference import noisy_batch_reference, speckle_noise_reference

    if name in ("reference", "reference-compiled"):
        # torch's global generator: a Generator argument would stop torch.compile's tracing
        ref = noisy_batch_reference if op == "batch" else speckle_noise_reference
        kw = {k: v for k, v in NOISE_KW.items()}

        def reference(x, out_dtype=torch.float32):
            if op == "batch":
                return ref(x, out_dtype=out_dtype, **kw)
            return ref(x, **kw)
        return _compile(reference) if name == "reference-compiled" else reference
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown implementation {name!r}")
    if name == "triton" and device.type != "cuda":
        raise Unavailable("Triton runs on CPU tensors only under its interpreter, which is not a speed")
    fused = N.make_noisy_batch if op == "batch" else N.add_speckle_noise
    probe = torch.zeros(1, 1, 4, 4, dtype=torch.uint8 if op == "batch" else torch.float32, device=device)
    try:
        fused(probe, backend=name, **NOISE_KW)
    except (RuntimeError, TypeError) as e:
        raise Unavailable(f"backend={name!r} is not available for the noise here: {e}") from e

    def kernel(x, out_dtype=torch.float32):
        if op == "batch":
            return fused(x, out_dtype=out_dtype, seed=3, offset=0, backend=name, **NOISE_KW)
        return fused(x, seed=3, offset=0, backend=name, **NOISE_KW)
    return kernel


def _counter_noise(v: torch.Tensor, seed: int) -> torch.Tensor:
    """The fused kernels' noisy values for intensities v, from the documented counter layout
    (speckle_kernels.reference.noise_fields / image_uniforms: plain torch integer arithmetic)."""
    from speckle_kernels import reference as R

    n1, n2 = R.noise_fields(v.numel(), seed=seed, offset=0, distribution=NOISE_KW["distribution"],
                            device=v.device)
    fs = NOISE_KW["factor"] * NOISE_KW["sigma_mult"]
    y = v.float().reshape(-1) * (1 + fs * n1) + NOISE_KW["sigma_add"] * n2
    return y.clamp(0, 1).view(v.shape)


def check_noise(name: str, fn, op: str, x: torch.Tensor, out_dtype=torch.float32) -> None:
    """Kernels: the exact values of the documented Philox stream (tolerances of
    tests/test_noise.py). torch.compile draws other random numbers than eager torch, so the
    compiled reference is held to the exact clean output and to the eager reference's
    distribution: mean and spread of the noisy values within 5 standard errors."""
    if name == "reference":
        return
    if op == "batch":
        noisy, clean = fn(x, out_dtype)
        v = x.float() / 255
        expected_clean = (v - 0.5) / 0.5
        if noisy.dtype != out_dtype or clean.dtype != out_dtype or noisy.shape != x.shape:
            raise AssertionError(f"{name}: outputs {noisy.dtype}/{clean.dtype} {tuple(noisy.shape)}")
        low = out_dtype != torch.float32
        # fp32: v = u8/255 is correctly rounded by the CUDA kernel and by torch on the CPU, but
        # torch's CUDA division by a scalar multiplies by the reciprocal (<= 1.5 ulp of v < 1,
        # i.e. 1.5 * 2**-24) and inductor may fuse 2*v - 1 differently: after the doubling,
        # |diff| <= 3 * 2**-24 < 2**-22.
        _close(clean, expected_clean, atol=1e-7 if low else 2.0**-22, rtol=2**-7 if low else 0.0,
               name=f"{name} clean")
    else:
        noisy, v = fn(x), x
    if name in KERNEL_BACKENDS:
        expected = _counter_noise(v, seed=3)
        if op == "batch":
            expected = (expected - 0.5) / 0.5
        low = noisy.dtype != torch.float32
        _close(noisy, expected, atol=1e-5 if low else 4e-6, rtol=2**-7 if low else 0.0, name=f"{name} noisy")
        return
    # The noise alone (noisy minus clean) must have the eager reference's mean and spread. Both
    # are means of n independent values: 5 standard errors of a difference of two such means,
    # doubled for the spread (its error also depends on the kurtosis).
    eager = noise_impl("reference", op, x.device)
    if op == "batch":
        ref_noisy, ref_clean = eager(x, out_dtype)
        a, b = (noisy.double() - clean.double()).flatten(), (ref_noisy.double() - ref_clean.double()).flatten()
    else:
        a, b = (noisy.double() - x.double()).flatten(), (eager(x).double() - x.double()).flatten()
    n, spread = a.numel(), b.std().item()
    bound = 5 * spread * math.sqrt(2 / n)
    if abs(a.mean().item() - b.mean().item()) > bound:
        raise AssertionError(f"{name}: noise mean {a.mean().item():.5g} vs eager {b.mean().item():.5g}")
    if abs(a.std().item() - spread) > 2 * bound:
        raise AssertionError(f"{name}: noise spread {a.std().item():.5g} vs eager {spread:.5g}")


# ----------------------------------------------------------------------------- SSIM

def ssim_pair(shape, device, seed=0):
    """(pred, target) in [0, 1]: a smooth target and a noisy prediction of it."""
    g = torch.Generator(device=device).manual_seed(seed)
    target = torch.rand(shape, generator=g, device=device)
    target = F.avg_pool2d(target, 5, stride=1, padding=2)
    pred = (target + 0.1 * torch.randn(shape, generator=g, device=device)).clamp(0, 1)
    return pred, target


def ssim_impl(name: str, device: torch.device):
    from speckle_kernels.metrics import ssim

    if name == "skimage":
        from skimage.metrics import structural_similarity

        def skimage_ssim(pred, target):
            p, t = pred.cpu().double().numpy(), target.cpu().double().numpy()
            return torch.tensor([structural_similarity(
                p[i, 0], t[i, 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False) for i in range(p.shape[0])])
        return skimage_ssim
    if name == "ssim-fp64":
        return lambda pred, target: ssim(pred, target, dtype=torch.float64)
    if name == "ssim-fp32":
        return lambda pred, target: ssim(pred, target, dtype=torch.float32)
    if name == "ssim-fp32-compiled":
        return _compile(lambda pred, target: ssim(pred, target, dtype=torch.float32))
    raise ValueError(f"unknown implementation {name!r}")


def check_ssim(name: str, fn, pred, target) -> None:
    """Agreement with scikit-image to 1e-4 per image (tests/test_metrics.py)."""
    if name == "skimage":
        return
    expected = ssim_impl("skimage", pred.device)(pred, target)
    _close(fn(pred, target).cpu(), expected, atol=1e-4, rtol=0.0, name=f"{name} ssim")


# ----------------------------------------------------------------------------- train step

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
    model = br_unet(norm="fused").to(device)
    from speckle_kernels import FusedBatchRenorm2d

    for module in model.modules():
        if isinstance(module, FusedBatchRenorm2d):
            module.backend = backend
    return model, PAPER_HPARAMS["br-unet"]["lr"]


def train_step_fn(model, lr: float):
    """One optimizer step as models/train.py takes it: forward, MSE, backward, Adamax."""
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
    import copy

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
    import copy

    from speckle_kernels import FusedBatchRenorm2d

    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, FusedBatchRenorm2d):
            module.backend = "reference"
    return ref
