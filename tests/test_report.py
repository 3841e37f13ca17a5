"""`python -m speckle_kernels`: the installation report (speckle_kernels/__main__.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from speckle_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(*args, **env) -> str:
    out = subprocess.run([sys.executable, "-m", "speckle_kernels", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_report_names_versions_backends_and_the_variant():
    text = _report("--check")
    assert f"torch {torch.__version__}" in text and "Triton " in text
    assert "C++ compiler (" in text and "ninja: " in text
    cpu = next(line for line in text.splitlines() if line.startswith("CPU tensors:"))
    if _ext.HAS_CPU_EXT:
        how = {"aot": "built ahead of time", "jit": "built just in time"}[_ext.cpu_status()["how"]]
        assert how in cpu and _ext.cpu_status()["path"] in cpu, cpu
        in_use = torch.ops.speckle_kernels.cpu_capability()
        assert f"kernel variant in use: {in_use}" in text
        assert "variants this CPU runs: " + ", ".join(torch.ops.speckle_kernels.cpu_capabilities()) in text
        assert f"backend='cpu' ({in_use} kernels): ok" in text
    else:
        assert "reference only" in cpu
    assert "just-in-time cache: " in text
    assert "CUDA tensors: " in text


def test_report_says_which_variant_was_asked_for():
    if not _ext.HAS_CPU_EXT:
        return
    text = _report(SPECKLE_CPU_CAPABILITY="default")
    assert "kernel variant in use: default (SPECKLE_CPU_CAPABILITY: default)" in text, text
    if "avx512" not in list(torch.ops.speckle_kernels.cpu_capabilities()):
        text = _report(SPECKLE_CPU_CAPABILITY="avx512")
        assert "note: SPECKLE_CPU_CAPABILITY=avx512 asks for more than this CPU has" in text, text
        assert "not: avx512 (no avx512f" in text, text
