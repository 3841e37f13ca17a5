"""Test configuration: Triton kernels run on CPU tensors under its interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
module imports speckle_kernels.
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible stream per test: fresh inputs, replayable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
