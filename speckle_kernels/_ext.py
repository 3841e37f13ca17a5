"""Loading the C++ (CPU) and CUDA C++ extensions, and what they report about themselves.

The extensions register operators in the `speckle_kernels` torch library (csrc/ops_schema.cpp
holds every schema; csrc/cpu/cpu_binding.cpp and csrc/cuda/cuda_binding.cpp the kernels).
The CPU kernels are obtained, in this order:
  aot    speckle_kernels/_C*.so, built by `pip install --no-build-isolation [-e] .`;
  jit    built just in time by _build.py into a cache, on first use (HAS_CPU_EXT is read
         lazily: the first dispatch to a CPU backend, not the import, compiles); a library
         already in the cache is loaded at import. SPECKLE_CPU_JIT=0 turns this off.
Without either, one warning names what is missing and what it costs; backend="auto" runs the
reference on CPU tensors and backend="cpu" raises with the reason (_backend.choose_backend).
The CUDA extension is ahead of time only; a failure to load it is kept and reported
(`python -m speckle_kernels`), and warned about where a GPU is present.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
import warnings

import torch

from . import _build

_HERE = os.path.dirname(os.path.abspath(__file__))
# BatchRenorm forward+backward at (32, 64, 128, 128) fp32, 2 threads: the reference's time over
# the C++ kernel's: 43.7x (benchmarks/results/cpu-2026-12-03/reference_ratio.json).
REFERENCE_SLOWDOWN = "~40x"

_cpu: dict | None = None  # {"ok", "how", "path", "error"} once settled
_cuda: dict = {"ok": False, "path": None, "error": "the CPU extension is not loaded"}
_on_cpu_load: list = []


def _find(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, name + suffix)
        if os.path.exists(path):
            return path
    return None


def _load(path: str) -> str | None:
    """Loads a library of ops; None, or why it failed."""
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as err:  # built against another torch, missing symbols...
        return f"{os.path.basename(path)} failed to load: {err}"
    return None


def _settle_cpu(build: bool) -> dict | None:
    """The CPU extension's state; None while only a just-in-time build could give it and
    `build` is False."""
    errors = []
    path = _find("_C")
    if path is not None:
        error = _load(path)
        if error is None:
            return {"ok": True, "how": "aot", "path": path, "error": None}
        errors.append(error)  # e.g. built for another torch: a just-in-time build can replace it
    root = _build.csrc_root()
    if os.environ.get("SPECKLE_CPU_JIT", "1") == "0":
        errors.append("no ahead-of-time build and SPECKLE_CPU_JIT=0")
    elif root is None:
        errors.append("no ahead-of-time build and no sources to build (speckle_kernels/_csrc or csrc/)")
    else:
        cached = _build.library_path(os.path.join(_build.cache_root(), _build.cache_key(root)))
        if not os.path.exists(cached):
            if not build:
                return None
            missing = _build.missing_tools()
            if missing:
                errors.append("no ahead-of-time build, and a just-in-time build needs " + " and ".join(missing))
                return {"ok": False, "how": None, "path": None, "error": "; ".join(errors)}
            try:
                cached = _build.jit_build(root, lambda line: print(line, file=sys.stderr, flush=True))
            except RuntimeError as err:
                errors.append(str(err))
                return {"ok": False, "how": None, "path": None, "error": "; ".join(errors)}
        error = _load(cached)
        if error is None:
            return {"ok": True, "how": "jit", "path": cached, "error": None}
        errors.append(error)
    return {"ok": False, "how": None, "path": None, "error": "; ".join(errors)}


def _check_variant(state: dict) -> dict:
    """The kernel variant must be settled (a SPECKLE_CPU_CAPABILITY naming no variant makes the
    kernels unusable); a request the CPU cannot honour is warned about."""
    try:
        note = torch.ops.speckle_kernels.cpu_capability_note()
    except (RuntimeError, ValueError) as err:
        return {**state, "ok": False, "error": str(err).splitlines()[0]}
    if note:
        warnings.warn(f"speckle_kernels: {note}", RuntimeWarning, stacklevel=3)
    return state


def _settle(build: bool) -> None:
    global _cpu, _cuda
    if _cpu is not None:
        return
    state = _settle_cpu(build)
    if state is None:
        return
    if state["ok"]:
        state = _check_variant(state)
    _cpu = state
    if not state["ok"]:
        warnings.warn(f"speckle_kernels: C++ CPU kernels unavailable ({state['error']}); backend='auto' "
                      f"runs the plain-PyTorch reference on CPU tensors, {REFERENCE_SLOWDOWN} slower for "
                      "BatchRenorm forward+backward, and backend='cpu' raises. `python -m speckle_kernels` "
                      "reports the details.", RuntimeWarning, stacklevel=3)
        return
    for fn in _on_cpu_load:
        fn()
    _cuda = _settle_cuda()


def _settle_cuda() -> dict:
    # The CUDA library adds kernels to _C's schemas, so it loads after the CPU one.
    path = _find("_C_cuda")
    if path is None:
        return {"ok": False, "path": None, "error": "not built (no CUDA toolkit or a CPU-only torch at "
                "build time, or SPECKLE_SKIP_CUDA_BUILD)"}
    if not torch.cuda.is_available():
        return {"ok": False, "path": path, "error": "no CUDA device"}
    error = _load(path)
    if error is not None:
        warnings.warn(f"speckle_kernels: CUDA extension unavailable ({error}); backend='auto' uses Triton "
                      "on CUDA tensors", RuntimeWarning, stacklevel=4)
    return {"ok": error is None, "path": path, "error": error}


def cpu_status(build: bool = True) -> dict | None:
    """{"ok", "how" ("aot" | "jit" | None), "path", "error"} of the CPU extension; settles it
    first (a just-in-time build if need be, unless build=False: then None while unsettled)."""
    _settle(build)
    return dict(_cpu) if _cpu is not None else None


def cuda_status() -> dict:
    """{"ok", "path", "error"} of the CUDA extension (after the CPU one has settled)."""
    _settle(True)
    return dict(_cuda)


def on_cpu_load(fn) -> None:
    """Runs fn() once the CPU extension's ops exist: now, or after a just-in-time build."""
    if _cpu is not None and _cpu["ok"]:
        fn()
    else:
        _on_cpu_load.append(fn)


def __getattr__(name: str):
    # HAS_CPU_EXT / HAS_CUDA_EXT are read when a backend is chosen: the first read may build.
    if name == "HAS_CPU_EXT":
        return cpu_status()["ok"]
    if name == "HAS_CUDA_EXT":
        return cuda_status()["ok"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cpu_output_cache_idle_bytes() -> int:
    """Bytes of released CPU kernel outputs kept for reuse (csrc/cpu/output_cache.cpp: outputs of
    1 MB and more; SPECKLE_CPU_OUTPUT_CACHE_MB caps them, default 1024, 0 turns the cache off)."""
    return int(torch.ops.speckle_kernels.cpu_output_cache_idle_bytes()) if cpu_status()["ok"] else 0


def empty_cpu_output_cache() -> int:
    """Free the idle buffers of the CPU output cache; returns the bytes freed."""
    return int(torch.ops.speckle_kernels.empty_cpu_output_cache()) if cpu_status()["ok"] else 0


_settle(build=False)  # an installed or cached library loads now; a build waits for first use
