"""Build and install speckle-kernels.

The Python package works alone (Triton on CUDA, the plain-PyTorch reference elsewhere). The C++
extensions in csrc/ are built against the torch that is installed, so install with
`pip install --no-build-isolation .`; without a compiler the package still imports and falls back.
"""
from setuptools import find_packages, setup

setup(
    name="speckle-kernels",
    version="0.1.0",
    description="Fused BatchRenorm and speckle-noise kernels for training ultrasound denoisers in PyTorch",
    packages=find_packages(include=["speckle_kernels", "speckle_kernels.*", "models", "models.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "scikit-image",
        "tqdm",
        "matplotlib",
        "ninja",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": []},
)
