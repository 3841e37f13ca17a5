"""Which implementations are present, and the one small rule that picks among them.

backend="auto" picks the fastest implementation present for the tensor's device and falls
back quietly; a backend asked for by name raises if it is missing (the rule Liger-Kernel
follows), so a benchmark never times a fallback by mistake.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional: the package must import and work on a CPU without it.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


def triton_interpreting() -> bool:
    """True when Triton kernels were defined under its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when a kernel is decorated, so it must be set before
    speckle_kernels is imported; that is what tests/conftest.py does.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend_name(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def triton_usable(device: torch.device) -> bool:
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return not triton_interpreting()
    return device.type == "cpu" and triton_interpreting()


def resolve_backend(backend: str, device: torch.device, *, has_cpu_ext: bool = False,
                    has_cuda_ext: bool = False) -> str:
    """Map a requested backend to the one that will run on `device`.

    auto: CUDA tensors -> cuda extension, else triton, else reference;
          CPU tensors  -> cpu extension, else reference.
    The CUDA extension comes first on a GPU: its kernels take the same GPU time as Triton's
    within 3% on fp32 (H100, graph replay), and its C++ launch path costs ~50 us of host time
    a BatchRenorm forward against ~200 us for Triton's Python launcher, which in eager
    training is the larger cost (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-25).
    """
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            if has_cuda_ext:
                return "cuda"
            return "triton" if triton_usable(device) else "reference"
        return "cpu" if (device.type == "cpu" and has_cpu_ext) else "reference"
    if backend == "reference":
        return backend
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' was asked for but Triton is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors runs under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing speckle_kernels")
        if device.type == "cuda" and triton_interpreting():
            raise RuntimeError("backend='triton' on CUDA tensors cannot run with TRITON_INTERPRET=1 set")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not support {device.type} tensors")
        return backend
    # "cuda" or "cpu": the extension of that name, for tensors on that device type
    built, extension = ((has_cuda_ext, "CUDA extension") if backend == "cuda"
                        else (has_cpu_ext, "C++ CPU extension"))
    if device.type != backend:
        raise RuntimeError(f"backend={backend!r} needs {backend.upper()} tensors, got a tensor on {device}")
    if not built:
        from . import _ext  # why it is missing (loaded after this module)
        status = _ext.cpu_status() if backend == "cpu" else _ext.cuda_status()
        raise RuntimeError(f"backend={backend!r} was asked for but the {extension} is not available: "
                           f"{status['error'] or 'not built'} (python -m speckle_kernels reports why)")
    return backend


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x as every fused backend (Triton, C++, CUDA) reads it: itself when contiguous or
    channels_last, else a contiguous copy. Outputs take this layout; the fake kernels use it to
    give torch.compile their strides."""
    order = (0, *range(2, x.dim()), 1)
    if x.is_contiguous() or x.permute(order).is_contiguous():
        return x
    return x.contiguous()
