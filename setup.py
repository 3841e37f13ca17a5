"""Build speckle-kernels' C++/CUDA extensions (metadata and extras: pyproject.toml).

The extensions in csrc/ are built against the torch that is installed, so
`pip install --no-build-isolation .` builds them at install time; without torch at build time
(pip's default build isolation) none is built here and the package builds them on first use.
"""
import glob
import os

from setuptools import find_packages, setup


def _cpu_vector_flags():
    """AVX2 + FMA + F16C when the building machine has them (at::vec then uses 256-bit
    vectors), and AVX-512 beside them where it has that; the extension is built where it runs.
    SPECKLE_CPU_VECTOR=0 turns them all off."""
    if os.environ.get("SPECKLE_CPU_VECTOR", "1") == "0":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    # AVX-512 for the noise kernel's explicit 16-lane path (csrc/cpu/noise_lanes.h); compiler
    # vectorization stays at 256 bits. SPECKLE_CPU_AVX512=0 leaves it out.
    if (os.environ.get("SPECKLE_CPU_AVX512", "1") != "0"
            and {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags)):
        avx2 += ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=256"]
    return avx2


def _openmp_flags():
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


def _extensions():
    """(ext_modules, cmdclass): the CPU extension always; the CUDA one when a toolkit and a CUDA
    build of torch are present and SPECKLE_SKIP_CUDA_BUILD is unset. MAX_JOBS and
    TORCH_CUDA_ARCH_LIST are read by torch's BuildExtension."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install, the package falls back
        return [], {}
    omp_compile, omp_link = _openmp_flags()
    cxx = ["-O3", *_cpu_vector_flags(), *omp_compile]  # the C++ standard: build_ext's
    exts = [cpp_extension.CppExtension(
        "speckle_kernels._C",
        sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args={"cxx": cxx}, extra_link_args=omp_link)]
    if (torch.version.cuda and cpp_extension.CUDA_HOME
            and not os.environ.get("SPECKLE_SKIP_CUDA_BUILD")):
        exts.append(cpp_extension.CUDAExtension(
            "speckle_kernels._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]}))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


_EXT_MODULES, _CMDCLASS = _extensions()

# Metadata, dependencies, extras and entry points are in pyproject.toml. The packages are listed
# here because speckle_models maps onto models/ and its subpackages must be named one by one.
setup(
    packages=(find_packages(include=["speckle_kernels", "speckle_kernels.*"])
              + ["speckle_models"] + ["speckle_models." + p for p in find_packages("models")]),
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
