"""The backends every kit-driven test runs on, and why one is skipped where it cannot run."""
from __future__ import annotations

import torch

from speckle_kernels import _ext
from speckle_kernels._backend import HAS_TRITON, triton_interpreting

BACKENDS = ("reference", "cpu", "triton", "cuda")


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live in the tests: CUDA for "cuda", and for Triton when its
    interpreter is off (a GPU run); the CPU otherwise."""
    if backend == "cuda" or (backend == "triton" and not triton_interpreting()):
        return torch.device("cuda")
    return torch.device("cpu")


def unavailable(backend: str) -> str | None:
    """None when the backend runs here, else the reason it does not."""
    if backend == "cpu" and not _ext.HAS_CPU_EXT:
        return "the C++ extension is not built (pip install --no-build-isolation -e .)"
    if backend == "triton":
        if not HAS_TRITON:
            return "Triton is not installed"
        if not triton_interpreting() and not torch.cuda.is_available():
            return "Triton needs a GPU or TRITON_INTERPRET=1"
    if backend == "cuda" and not _ext.HAS_CUDA_EXT:
        return "no GPU with the CUDA extension here (benchmarks/tools/gpu_check.py runs this kit on one)"
    return None


def require(backend: str) -> torch.device:
    """The backend's device, or a pytest skip naming why it cannot run here (for tests)."""
    reason = unavailable(backend)
    if reason:
        import pytest

        pytest.skip(reason)
    return device_for(backend)
