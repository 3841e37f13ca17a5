"""`python -m speckle_kernels`: what this installation runs, in the spirit of
torch.utils.collect_env and DeepSpeed's ds_report.

Versions (torch, Triton, the C++ compiler, ninja); which backends are present for CPU and CUDA
tensors and why any is not; the CPU kernel variant in use and those the CPU runs; how the C++
extension was obtained (ahead of time, or just in time with its cache). The report itself builds
nothing: --build runs a pending just-in-time build first, --check runs a small BatchRenorm
forward+backward through each CPU backend present against the float64 reference.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import __version__, _build, _ext
from ._backend import HAS_TRITON, triton_interpreting

VARIANTS = ("default", "avx2", "avx512")
# What each variant needs, as /proc/cpuinfo names it (csrc/cpu/cpu_dispatch.cpp).
VARIANT_FLAGS = {"avx2": ("avx2", "fma", "f16c"),
                 "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl")}


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"not found ({err.__class__.__name__})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else f"failed (exit {out.returncode})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's flags as Linux names them (empty where there is no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _triton_version() -> str:
    if not HAS_TRITON:
        return "not installed"
    import triton
    return triton.__version__


def _cpu_lines(state: dict | None) -> list[str]:
    root = _build.csrc_root()
    jit_dir = os.path.join(_build.cache_root(), _build.cache_key(root)) if root else None
    lines = []
    if state is None:
        lines.append("CPU tensors:  C++ kernels not built yet: the first use builds them just in time "
                     "(or: python -m speckle_kernels --build)")
    elif state["ok"]:
        how = {"aot": "built ahead of time (setup.py)", "jit": "built just in time"}[state["how"]]
        lines.append(f"CPU tensors:  C++ kernels, {how}: {state['path']}")
        ops = torch.ops.speckle_kernels
        in_use, runs = str(ops.cpu_capability()), [str(v) for v in ops.cpu_capabilities()]
        asked = os.environ.get("SPECKLE_CPU_CAPABILITY") or "unset"
        lines.append(f"  kernel variant in use: {in_use} (SPECKLE_CPU_CAPABILITY: {asked}); "
                     f"noise lane widths {list(ops.cpu_noise_lane_widths())}")
        note = str(ops.cpu_capability_note())
        if note:
            lines.append(f"  note: {note}")
        flags = cpu_flags()
        # the dispatch reads CPUID; /proc/cpuinfo can disagree (under QEMU it is the host's)
        cannot = [f"{v} (no {', '.join(f for f in VARIANT_FLAGS[v] if f not in flags)})"
                  if any(f not in flags for f in VARIANT_FLAGS[v]) else
                  f"{v} (CPUID lacks it; /proc/cpuinfo claims it: an emulator or a masked CPU?)"
                  for v in VARIANTS if v not in runs and v in VARIANT_FLAGS]
        lines.append(f"  variants this CPU runs: {', '.join(runs)}"
                     + (f"; not: {'; '.join(cannot)}" if cannot else ""))
    else:
        lines.append(f"CPU tensors:  plain-PyTorch reference only ({_ext.REFERENCE_SLOWDOWN} slower): "
                     f"{state['error']}")
    lines.append(f"  sources: {root or 'none shipped'}; just-in-time cache: {jit_dir or '-'} "
                 f"({'holds a build' if jit_dir and os.path.exists(_build.library_path(jit_dir)) else 'empty'})")
    return lines


def _cuda_lines(state: dict | None) -> list[str]:
    if not torch.cuda.is_available():
        gpu = "no CUDA device" + ("" if torch.version.cuda else " (a CPU-only torch)")
        triton = "Triton's interpreter (TRITON_INTERPRET=1)" if HAS_TRITON and triton_interpreting() else None
        return [f"CUDA tensors: none: {gpu}" + (f"; CPU tensors can also run {triton}" if triton else "")]
    cuda = _ext.cuda_status() if state is not None and state["ok"] else None
    have = []
    if cuda and cuda["ok"]:
        have.append("CUDA extension")
    if HAS_TRITON and not triton_interpreting():
        have.append("Triton")
    lines = [f"CUDA tensors: {', '.join(have) or 'plain-PyTorch reference only'} "
             f"({torch.cuda.get_device_name(0)})"]
    if not (cuda and cuda["ok"]):
        lines.append(f"  CUDA extension: {cuda['error'] if cuda else 'needs the CPU extension first'}")
    if not HAS_TRITON:
        lines.append("  Triton: not installed")
    return lines


def report() -> str:
    """The report's text; builds nothing."""
    state = _ext.cpu_status(build=False)
    cxx = os.environ.get("CXX", "c++")
    ninja = shutil.which("ninja") or (os.path.join(_build._ninja_package_bin(), "ninja")
                                      if _build._ninja_package_bin() else None)
    lines = [
        f"speckle_kernels {__version__}: {os.path.dirname(os.path.abspath(__file__))}",
        f"Python {platform.python_version()}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}); Triton {_triton_version()}",
        f"CPU: {_cpu_model()} ({platform.machine()}), {torch.get_num_threads()} torch threads",
        f"C++ compiler ({cxx}): {_first_line([cxx, '--version'])}",
        f"ninja: {_first_line([ninja, '--version']) if ninja else 'not found'}",
        "",
        *_cpu_lines(state),
        *_cuda_lines(state),
    ]
    return "\n".join(lines)


def check_cpu() -> str:
    """BatchRenorm forward+backward through FusedBatchRenorm2d on each CPU backend present,
    against the reference in float64: one line each."""
    from .layers import FusedBatchRenorm2d

    torch.manual_seed(0)
    x = torch.randn(4, 3, 9, 11, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    results = {}
    for backend in ("reference", "cpu") if _ext.HAS_CPU_EXT else ("reference",):
        dtype = torch.float64 if backend == "reference" else torch.float32
        xi = x.detach().to(dtype, copy=True).requires_grad_()
        y = FusedBatchRenorm2d(3, backend=backend).to(dtype)(xi)
        y.backward(dy.to(dtype))
        results[backend] = (y.detach().double(), xi.grad.double())
    lines = []
    for backend, (y, dx) in results.items():
        if backend == "reference":
            continue
        err = max(float((y - results["reference"][0]).abs().max()), float((dx - results["reference"][1]).abs().max()))
        verdict = "ok" if err < 1e-4 else "WRONG"
        lines.append(f"check: FusedBatchRenorm2d forward+backward, backend={backend!r} "
                     f"({torch.ops.speckle_kernels.cpu_capability()} kernels): {verdict} (max error {err:.1e})")
        if verdict != "ok":
            raise SystemExit("\n".join(lines))
    return "\n".join(lines) or "check: no C++ CPU backend to check"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speckle_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="run a pending just-in-time build first")
    parser.add_argument("--check", action="store_true",
                        help="run BatchRenorm forward+backward on each CPU backend against the reference")
    args = parser.parse_args(argv)
    if args.build or args.check:
        _ext.cpu_status(build=True)
    print(report())
    if args.check:
        print(check_cpu())


if __name__ == "__main__":
    main(sys.argv[1:])
