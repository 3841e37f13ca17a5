"""The CPU output cache (csrc/cpu/output_cache.cpp): outputs of 1 MB and more reuse released
buffers, hold the right values in them, keep their layout, and respect the cap."""
from __future__ import annotations

import gc

import pytest
import torch

import speckle_kernels as sk
from speckle_kernels import _ext, noise_ext
from speckle_kernels.reference import batch_renorm_reference

from .helpers import assert_close

pytestmark = pytest.mark.skipif(
    _ext is None or not _ext.HAS_CPU_EXT,
    reason="C++ extension not built (pip install --no-build-isolation -e .)")

BIG = (2, 3, 1200, 1300)      # 37.4 MB in fp32: through the cache
SMALL = (2, 3, 100, 120)       # 288 KB: plain allocations


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.delenv("SPECKLE_CPU_OUTPUT_CACHE_MB", raising=False)
    sk.empty_cpu_output_cache()
    yield
    gc.collect()
    sk.empty_cpu_output_cache()


def _state(c):
    return [torch.randn(c) * 0.7, torch.rand(c) * 2 + 0.3, torch.tensor(700)]


def _input(shape, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.5 + torch.randn(shape[1], 1, 1, generator=g)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _rounded(nbytes):
    huge = 2 << 20
    return (nbytes + huge - 1) // huge * huge


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_released_output_is_reused_and_overwritten(channels_last):
    state = _state(3)
    y1 = sk.batch_renorm(_input(BIG, 1, channels_last), *state, backend="cpu")
    ptr, nbytes = y1.data_ptr(), y1.untyped_storage().nbytes()
    assert sk.cpu_output_cache_idle_bytes() == 0
    del y1
    assert sk.cpu_output_cache_idle_bytes() == _rounded(nbytes)
    x2 = _input(BIG, 2, channels_last)
    ref_state = [s.clone() for s in state]
    y2 = sk.batch_renorm(x2, *state, backend="cpu")
    assert y2.data_ptr() == ptr, "the released buffer was not reused"
    assert sk.cpu_output_cache_idle_bytes() == 0
    assert y2.stride() == x2.stride()
    yr = batch_renorm_reference(x2, *ref_state)
    assert_close(y2, yr, atol=1e-5 * yr.abs().max().item(), rtol=1e-5, name="y from a reused buffer")


def test_live_outputs_never_share_a_buffer():
    state = _state(3)
    x = _input(BIG, 3).requires_grad_()
    y = sk.batch_renorm(x, *state, backend="cpu")
    dy = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    y2 = sk.batch_renorm(x.detach(), *state, backend="cpu")
    ptrs = {t.data_ptr() for t in (y, dx, y2)}
    assert len(ptrs) == 3


def test_small_outputs_bypass_the_cache():
    y = sk.batch_renorm(_input(SMALL, 4), *_state(3), backend="cpu")
    del y
    assert sk.cpu_output_cache_idle_bytes() == 0


def test_cap_frees_the_longest_idle(monkeypatch):
    per = _rounded(torch.Size(BIG).numel() * 4)
    monkeypatch.setenv("SPECKLE_CPU_OUTPUT_CACHE_MB", str((per + per // 2) >> 20))  # room for one
    state = _state(3)
    a = sk.batch_renorm(_input(BIG, 5), *state, backend="cpu")
    b = sk.batch_renorm(_input(BIG, 6), *state, backend="cpu")
    b_ptr = b.data_ptr()
    del a, b
    assert sk.cpu_output_cache_idle_bytes() == per
    c = sk.batch_renorm(_input(BIG, 7), *state, backend="cpu")
    assert c.data_ptr() == b_ptr, "the most recently released buffer should be the one kept"
    del c
    assert sk.empty_cpu_output_cache() == per
    assert sk.cpu_output_cache_idle_bytes() == 0


def test_cap_zero_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("SPECKLE_CPU_OUTPUT_CACHE_MB", "0")
    x = _input(BIG, 8)
    state = _state(3)
    ref_state = [s.clone() for s in state]
    y = sk.batch_renorm(x, *state, backend="cpu")
    yr = batch_renorm_reference(x, *ref_state)
    assert_close(y, yr, atol=1e-5 * yr.abs().max().item(), rtol=1e-5, name="y without the cache")
    del y
    assert sk.cpu_output_cache_idle_bytes() == 0


@pytest.mark.parametrize("value", ["lots", "-5", "1.5"])
def test_bad_cap_is_refused_with_buffers_untouched(monkeypatch, value):
    monkeypatch.setenv("SPECKLE_CPU_OUTPUT_CACHE_MB", value)
    state = _state(3)
    before = [s.clone() for s in state]
    with pytest.raises(ValueError, match=f"SPECKLE_CPU_OUTPUT_CACHE_MB.*'{value}'"):
        sk.batch_renorm(_input(BIG, 9), *state, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "buffers changed"


def test_cached_output_resizes_and_survives_its_layer():
    y = sk.batch_renorm(_input(BIG, 10), *_state(3), backend="cpu")
    first = y[0].clone()
    y.resize_(3, 3, 1200, 1300)  # storage grows through the same allocator
    assert torch.equal(y[0], first)
    y.fill_(1.5)
    assert float(y.sum()) == 1.5 * y.numel()


def test_noise_outputs_reuse_released_buffers():
    # two 2 MB outputs a call: the batch maker's page faults were the reason for the 1 MB floor
    u8 = torch.randint(0, 256, (32, 1, 128, 128), dtype=torch.uint8)
    noisy, clean = noise_ext.make_noisy_batch(u8, seed=4)
    ptrs = {noisy.data_ptr(), clean.data_ptr()}
    first = noisy.clone()
    del noisy, clean
    again, clean = noise_ext.make_noisy_batch(u8, seed=4)
    assert {again.data_ptr(), clean.data_ptr()} == ptrs
    assert torch.equal(again, first)
