"""Which implementations are present, and the one rule that picks among them for every op
(BatchRenorm, the norm block, the speckle noise).

    choose_backend(backend, device, dtype=None, kernel_dtypes=KERNEL_DTYPES) -> name

backend="auto" picks the fastest implementation present for the tensor's device and falls
back quietly; a backend asked for by name raises if it is missing (the rule Liger-Kernel
follows), so a benchmark never times a fallback by mistake. An input dtype no fused kernel
takes (float64; kernel_dtypes) runs the reference under "auto" and is refused by name.
On a GPU, why the CUDA extension did not load is printed once, by _ext.py.
"""
from __future__ import annotations

import os

import torch

from . import _ext

try:  # Triton is optional: the package must import and work on a CPU without it.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _device_rule(backend: str, device: torch.device, has_cpu_ext: bool, has_cuda_ext: bool) -> str:
    # auto: CUDA tensors -> cuda extension, else triton, else reference;
    #       CPU tensors  -> cpu extension, else reference.
    # The CUDA extension comes first on a GPU: its kernels take the same GPU time as Triton's
    # within 3% on fp32 (H100, graph replay), and its C++ launch path costs ~50 us of host time
    # a BatchRenorm forward against ~200 us for Triton's Python launcher, which in eager
    # training is the larger cost (benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-25).
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
        status = _ext.cpu_status() if backend == "cpu" else _ext.cuda_status()
        raise RuntimeError(f"backend={backend!r} was asked for but the {extension} is not available: "
                           f"{status['error'] or 'not built'} (python -m speckle_kernels reports why)")
    return backend


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
                   kernel_dtypes: tuple = KERNEL_DTYPES, has_cpu_ext: bool | None = None,
                   has_cuda_ext: bool | None = None) -> str:
    """The backend that runs a tensor of `dtype` on `device` (dtype None: no dtype rule).

    has_cpu_ext / has_cuda_ext default to the extensions loaded here (_ext.py); the tests pass
    them to check the rule alone."""
    check_backend_name(backend)
    chosen = _device_rule(backend, device,
                          _ext.HAS_CPU_EXT if has_cpu_ext is None else has_cpu_ext,
                          _ext.HAS_CUDA_EXT if has_cuda_ext is None else has_cuda_ext)
    if chosen != "reference" and dtype is not None and dtype not in kernel_dtypes:
        if backend != "auto":
            names = ", ".join(str(t).replace("torch.", "") for t in kernel_dtypes)
            raise TypeError(f"backend={backend!r} supports {names}, got {dtype}")
        chosen = "reference"
    return chosen
