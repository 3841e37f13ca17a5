"""What every benchmark group shares: device and size, timing, copy bandwidth, byte counts and
the comparison helper. Nothing here imports pytest, so `python -m benchmarks.tools.gpu_check` runs
without it.

Sizes (SPECKLE_BENCH_SIZE, or pytest's --speckle-size):
    full   GPU default: every case at its real size.  On a CPU only the fp32 contiguous
           headline runs at its real size, the rest stays small, so the run stays minutes long.
    small  CPU default (and CI): batch 4, 64x64 images; a few rounds.

Each row records the bytes its op must move (the byte models live beside each op's cases) and
its fraction of a large copy timed in the same session, so a row says how far it is from the
limit it is measured against.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time

import torch

SIZES = ("small", "full")
BATCH, IMAGE = 32, 128               # the paper's batch and image size
SMALL_BATCH, SMALL_IMAGE = 4, 64
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNEL_BACKENDS = ("triton", "cuda", "cpu")


class Unavailable(Exception):
    """An implementation that is not present here; the benchmark is skipped with this reason."""


def probe_backend(backend: str, device: torch.device, call) -> None:
    """Raise Unavailable when `backend` cannot run here. call() runs a tiny input through the
    backend asked for by name: a missing one raises (RuntimeError, NotImplementedError from an
    op without a kernel, TypeError, ImportError) rather than fall back, which is what tells a
    missing implementation from a present one. Any other exception is a real failure."""
    if backend == "triton" and device.type != "cuda":
        raise Unavailable("Triton runs on CPU tensors only under its interpreter, which is not a speed")
    try:
        call()
    except (RuntimeError, TypeError, ImportError) as e:
        raise Unavailable(f"backend={backend!r} is not available here: {str(e).splitlines()[0][:200]}") from e


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


# ----------------------------------------------------------------------------- bytes and timing

def rotation_count(tensor_bytes: int, device: torch.device) -> int:
    """Input buffers to cycle through so each call reads memory, not a warm cache: the GPU's
    L2 is 50-60 MB (a bf16 (32, 32, 128, 128) tensor fits), a CPU's last-level cache less."""
    cold = (256 if device.type == "cuda" else 64) * 2**20
    return max(1, min(16, math.ceil(cold / max(tensor_bytes, 1))))


def tensor_bytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


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


def autograd_memory(step, device: torch.device) -> dict:
    """What one call of step() keeps for backward: the bytes of the unique storages autograd
    saves (torch.autograd.graph.saved_tensors_hooks; device independent), and on CUDA the peak
    memory the call allocates above what was allocated before it (torch.cuda.max_memory_allocated)."""
    storages: dict[tuple, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.device.type, s.data_ptr())] = s.nbytes()
        return t

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    synchronize(device)
    out = {"saved_bytes": sum(storages.values()), "saved_storages": len(storages)}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return out


def compile_fresh(fn, fullgraph: bool = False):
    """torch.compile with fresh caches: each benchmark warms its own graph, and a hit on the
    recompile limit raises instead of falling back to eager without a word (fullgraph: so does
    a graph break)."""
    import torch._dynamo

    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph)


def assert_verdict(verdict) -> None:
    """Fail with the kit's report unless its judge passed the backend."""
    if verdict.failures:
        raise AssertionError(verdict.report() + "\n" + "\n".join(verdict.failures))


def assert_close(actual, expected, *, atol, rtol, name):
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


def matmul_peak(device: torch.device, reps: int = 5) -> dict:
    """This device's measured matmul rates (FLOP/s, median of `reps`): torch.matmul of square
    fp32 and bf16 operands, and int8 x int8 -> int32 (torch._int_mm) where it runs. The sizes
    run at the device's compute limit (8192 on a GPU; 512 on a CPU, whose 1 MB operands stay in
    its caches, and where an emulated bf16 or int8 matmul of 1024 took ~15 s a call)."""
    n = 8192 if device.type == "cuda" else 512
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        if dtype == torch.int8:
            a = torch.randint(-8, 8, (n, n), dtype=dtype, device=device)
            b = torch.randint(-8, 8, (n, n), dtype=dtype, device=device)
            call = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            call = lambda: torch.matmul(a, b)  # noqa: E731
        try:
            median = statistics.median(time_calls(call, device, reps, warmup=1))
        except (RuntimeError, NotImplementedError):
            rates[name] = None
            continue
        rates[name] = 2 * n ** 3 / median
    return rates
