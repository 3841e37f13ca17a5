"""How the C++ CPU extension is built: ahead of time by setup.py, or just in time here.

One source list and one set of flags serve both (setup.py loads this file by path, before
speckle_kernels can be imported). The kernels' instruction sets live in their variants'
translation units (csrc/variants/, `#pragma GCC target`), so the flags hold no -m option:
the library runs on any x86-64 CPU and picks its kernels at load (csrc/cpu/cpu_dispatch.cpp).

Just in time (DeepSpeed's op builder does the same): when no ahead-of-time build is installed
(`pip install .` with build isolation has no torch to build against), the first use compiles
the sources with torch.utils.cpp_extension.load (ninja) into a cache keyed by the torch
version, the Python ABI, the variant set and a hash of the sources, under
$XDG_CACHE_HOME/speckle_kernels (default ~/.cache). An fcntl lock makes processes that start
at once build it once; the others wait and load the result.

Standard library only at import time: setup.py runs without torch.
"""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import shutil
import sys

# Sources, relative to csrc/, in link order. Inline functions of torch's and the standard
# library's headers that a variant's translation unit emits out of line are COMDAT copies
# compiled for its ISA, and the linker keeps the first copy it sees; a translation unit that
# calls such a function out of line emits its own copy. So baseline objects come first, then the
# variants from least to most capable: code never runs a copy compiled for more than its own
# ISA (tests/test_cpu_dispatch.py follows the calls in the disassembled library to prove it).
# setuptools links in sorted path order (for reproducible builds), the just-in-time build in
# this order: the names make the two the same (csrc/variants/ sorts after csrc/cpu/ and
# csrc/ops_schema.cpp; the digits order the variants), and a test checks it.
BASELINE_SOURCES = ("cpu/cpu_binding.cpp", "cpu/cpu_dispatch.cpp", "cpu/output_cache.cpp", "ops_schema.cpp")
VARIANT_SOURCES = ("variants/kernels_0_default.cpp", "variants/kernels_1_avx2.cpp",
                   "variants/kernels_2_avx512.cpp")
CPU_SOURCES = BASELINE_SOURCES + VARIANT_SOURCES
# What the CPU build reads: shipped inside the package as speckle_kernels/_csrc (setup.py).
CSRC_PATTERNS = ("*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "variants/*.cpp", "variants/*.h", "include/*.h")
JIT_NAME = "speckle_kernels_C"
_HERE = os.path.dirname(os.path.abspath(__file__))


def variant_set() -> str:
    """The variants the sources build here (the condition of csrc/variants/kernels_[12]_avx*.cpp)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return "default+avx2+avx512"
    return "default"


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags: -fopenmp where torch's intra-op pool is OpenMP (Linux builds).
    at::parallel_for is inline in ATen's headers and runs serially in code compiled without it.
    The extension links the libgomp that torch ships when there is one (wheels may rename it),
    so it shares torch's OpenMP runtime and torch.set_num_threads governs it; else the
    compiler's. SPECKLE_OPENMP=0 turns it off."""
    if os.environ.get("SPECKLE_OPENMP", "1") == "0":
        return [], []
    try:
        import torch
        if "OpenMP" not in torch.__config__.parallel_info():
            return [], []
        bundled = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    except Exception:
        return [], []
    return ["-fopenmp"], ([bundled[0]] if bundled else ["-fopenmp"])


def cpu_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags of the CPU extension; the C++ standard is torch's."""
    omp_compile, omp_link = openmp_flags()
    return ["-O3", *omp_compile], omp_link


def csrc_root() -> str | None:
    """The sources: the copy shipped in the package (a normal install or a wheel), else the
    repository's csrc/ beside the package (an editable install or a checkout); None if neither."""
    for root in (os.path.join(_HERE, "_csrc"), os.path.join(os.path.dirname(_HERE), "csrc")):
        if all(os.path.isfile(os.path.join(root, s)) for s in CPU_SOURCES):
            return root
    return None


def csrc_files(root: str) -> list[str]:
    """Every file the CPU build reads, relative to root, sorted."""
    files = {os.path.relpath(p, root) for pattern in CSRC_PATTERNS
             for p in glob.glob(os.path.join(root, pattern))}
    return sorted(files)


def source_hash(root: str) -> str:
    digest = hashlib.sha256()
    for rel in csrc_files(root):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "speckle_kernels")


def cache_key(root: str) -> str:
    import torch
    abi = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__}-{abi}-{variant_set()}-{source_hash(root)}"


def library_path(build_dir: str) -> str:
    return os.path.join(build_dir, JIT_NAME + ".so")


def missing_tools() -> list[str]:
    """What a just-in-time build needs and cannot find: the C++ compiler torch uses ($CXX, else
    c++) and ninja (the `ninja` package's binary counts even when its bin/ is not on PATH)."""
    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} is not on PATH)")
    if shutil.which("ninja") is None and _ninja_package_bin() is None:
        missing.append("ninja (pip install ninja)")
    return missing


def _ninja_package_bin() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    path = os.path.join(ninja.BIN_DIR, "ninja")
    return ninja.BIN_DIR if os.path.exists(path) else None


def jit_build(root: str, announce) -> str:
    """Build (or find) the just-in-time library for these sources and return its path; the
    caller loads it. announce(message) is called once, only when this process compiles.
    Raises RuntimeError (with the compiler's output) when the build fails."""
    import fcntl

    key_dir = os.path.join(cache_root(), cache_key(root))
    os.makedirs(key_dir, exist_ok=True)
    path = library_path(key_dir)
    # flock, not torch's lock file: the kernel releases it when a holder dies, so a build killed
    # half-way never leaves the next process waiting for ever.
    with open(key_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        announce(f"speckle_kernels: building the C++ CPU kernels for torch {_torch_version()} "
                 f"(once; a few minutes) into {key_dir}")
        _compile(root, key_dir)
        if not os.path.exists(path):
            raise RuntimeError(f"the just-in-time build finished without {path}")
    return path


def _torch_version() -> str:
    import torch
    return torch.__version__


def _compile(root: str, key_dir: str) -> None:
    import subprocess

    from torch.utils import cpp_extension

    if shutil.which("ninja") is None and _ninja_package_bin() is not None:
        os.environ["PATH"] = _ninja_package_bin() + os.pathsep + os.environ.get("PATH", "")
    cflags, ldflags = cpu_flags()
    sources = [os.path.join(root, s) for s in CPU_SOURCES]
    try:
        # Builds in key_dir, with torch's flags and ours; a library, not a Python module.
        cpp_extension.load(name=JIT_NAME, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags,
                           build_directory=key_dir, is_python_module=False, verbose=False)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        raise RuntimeError(f"the just-in-time build of the CPU kernels failed in {key_dir}: {err}") from err
