"""Build speckle-kernels' C++/CUDA extensions (metadata and extras: pyproject.toml).

The Python package works alone (Triton on CUDA, the plain-PyTorch reference elsewhere). The C++
CPU extension is built ahead of time against the installed torch when torch is importable here
(`pip install --no-build-isolation .`); otherwise (pip's default build isolation has no torch)
its sources ship inside the package (speckle_kernels/_csrc) and speckle_kernels/_build.py
compiles them just in time on first use. The CUDA extension is built ahead of time only.
Source list and flags: speckle_kernels/_build.py, one for both ways.
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """speckle_kernels/_build.py by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location(
        "_speckle_kernels_build", os.path.join(_HERE, "speckle_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_module()


class BuildPyWithSources(build_py):
    """Copies the CPU sources (csrc/, a fixed top-level folder) into the built package as
    speckle_kernels/_csrc, for the just-in-time build of a non-editable install or a wheel.
    An editable install reads the repository's csrc/ instead."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "speckle_kernels", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        for rel in _build.csrc_files(os.path.join(_HERE, "csrc")):
            self.mkpath(os.path.dirname(os.path.join(target, rel)))  # copy_file makes no folders
            self.copy_file(os.path.join("csrc", rel), os.path.join(target, rel), preserve_mode=False)


def _extensions():
    """(ext_modules, cmdclass): the CPU extension when torch is importable; the CUDA one too when
    a toolkit and a CUDA build of torch are present and SPECKLE_SKIP_CUDA_BUILD is unset.
    MAX_JOBS and TORCH_CUDA_ARCH_LIST are read by torch's BuildExtension."""
    cmdclass = {"build_py": BuildPyWithSources}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: the kernels are built just in time on first use
        return [], cmdclass
    cflags, ldflags = _build.cpu_flags()
    exts = [cpp_extension.CppExtension(
        "speckle_kernels._C", [os.path.join("csrc", s) for s in _build.CPU_SOURCES],  # in link order
        extra_compile_args={"cxx": cflags}, extra_link_args=ldflags)]
    if (torch.version.cuda and cpp_extension.CUDA_HOME
            and not os.environ.get("SPECKLE_SKIP_CUDA_BUILD")):
        exts.append(cpp_extension.CUDAExtension(
            "speckle_kernels._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]}))
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return exts, cmdclass


_EXT_MODULES, _CMDCLASS = _extensions()

# Metadata, dependencies, extras and entry points are in pyproject.toml. The packages are listed
# here because speckle_models maps onto models/ and its subpackages must be named one by one.
setup(
    packages=(find_packages(include=["speckle_kernels", "speckle_kernels.*"])
              + ["speckle_models"] + ["speckle_models." + p for p in find_packages("models")]),
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
)
