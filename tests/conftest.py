"""Test configuration: on a machine without a GPU, Triton kernels run on CPU tensors under its
interpreter; on a GPU machine they run on the GPU, and the tests that need the interpreter skip.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
module imports speckle_kernels. (On the GPU image the interpreter is also unusable: Triton 3.6's
turns loop bounds into ints with int(np.array([n])), which NumPy >= 2.4 refuses.)
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible stream per test: fresh inputs, replayable failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def one_thread():
    # Tiny tensors on a shared 2-core machine: two intra-op threads spin against each other and
    # make such calls 10-50x slower than one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One data cache for the session: the tiny phantom sets are made once."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_data(cache_dir):
    """A 16x16 phantom set (24 train+val, 8 test images): enough for one quick epoch."""
    from speckle_models.data.datasets import load_dataset

    return load_dataset("phantom", image_size=16, count=24, test_count=8, cache_dir=cache_dir,
                        progress=False)
