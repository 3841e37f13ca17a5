"""Loading the C++ (CPU) and CUDA C++ extensions, and what they report about themselves.

The extensions register operators in the `speckle_kernels` torch library (csrc/ops_schema.cpp
holds every schema; csrc/cpu/cpu_binding.cpp and csrc/cuda/cuda_binding.cpp the kernels).
This module loads the built shared objects (speckle_kernels/_C*.so, placed by
`pip install -e .` or a normal install) and exposes HAS_CPU_EXT / HAS_CUDA_EXT; each op's
glue is in its own file (batch_renorm_ext.py, noise_ext.py). Without a built extension the
package still imports; one warning says why.
"""
from __future__ import annotations

import importlib.machinery
import os
import warnings

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _find(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def _load(name: str) -> tuple[bool, str | None]:
    path = _find(name)
    if path is None:
        return False, f"{name} is not built"
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as err:  # built against another torch, missing symbols...
        return False, f"{os.path.basename(path)} failed to load: {err}"
    return True, None


HAS_CPU_EXT, _cpu_error = _load("_C")
HAS_CUDA_EXT, _cuda_error = False, None
if torch.cuda.is_available():  # the CUDA library adds kernels to _C's schemas
    if HAS_CPU_EXT:
        HAS_CUDA_EXT, _cuda_error = _load("_C_cuda")
    else:
        _cuda_error = f"it needs the C++ extension, which is unavailable: {_cpu_error}"
if not HAS_CPU_EXT:
    warnings.warn(f"speckle_kernels: C++ extension unavailable ({_cpu_error}); backend='auto' "
                  "uses the reference on CPU. Build it with `pip install --no-build-isolation -e .`",
                  RuntimeWarning, stacklevel=2)
if torch.cuda.is_available() and not HAS_CUDA_EXT:
    # On a GPU a missing CUDA extension changes what "auto" runs (Triton or the reference):
    # say why once, rather than fall back silently.
    warnings.warn(f"speckle_kernels: CUDA extension unavailable ({_cuda_error}); backend='auto' "
                  "uses Triton (else the reference) on CUDA tensors", RuntimeWarning, stacklevel=2)


def load_error(backend: str) -> str | None:
    """Why the extension of `backend` ("cpu" or "cuda") is not loaded here (None: loaded, or
    no GPU to load the CUDA one for)."""
    return _cpu_error if backend == "cpu" else _cuda_error


def cpu_output_cache_idle_bytes() -> int:
    """Bytes of released CPU kernel outputs kept for reuse (csrc/cpu/output_cache.cpp: outputs of
    1 MB and more; SPECKLE_CPU_OUTPUT_CACHE_MB caps them, default 1024, 0 turns the cache off)."""
    return int(torch.ops.speckle_kernels.cpu_output_cache_idle_bytes()) if HAS_CPU_EXT else 0


def empty_cpu_output_cache() -> int:
    """Free the idle buffers of the CPU output cache; returns the bytes freed."""
    return int(torch.ops.speckle_kernels.empty_cpu_output_cache()) if HAS_CPU_EXT else 0
