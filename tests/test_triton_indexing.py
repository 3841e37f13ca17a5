"""The Triton kernels' element offsets past 2**31, under the interpreter, on small tensors.

A tensor with more than 2**31 elements does not fit a test, but its offsets do: a probe kernel
calls the kernels' own offset helpers (tile_offsets and first_offsets of the BatchRenorm
kernels, block_offsets of the norm block) at tiles far into such a tensor, with its real
strides, and writes the offsets it gets into a small int64 tensor. The interpreter computes in
the kernels' own integer types (numpy int32 wraps as the GPU does), so a product formed in int32
shows as a wrong offset here. The host's rule for switching to int64 (needs_index_64) is checked
on the same shapes, and tests/test_aot_compile.py checks the compiled kernels' TTIR for int32
stride products. The launch geometry follows Layout / _BlockLayout (channels_last: one outer
row of N*L positions of C channels, 16 x 128 tiles; contiguous: 1 x 2048 tiles).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from speckle_kernels._backend import triton_interpreting  # noqa: E402

if not triton_interpreting():
    pytest.skip("the probes run under Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton.language as tl  # noqa: E402

from speckle_kernels import triton_common as tc  # noqa: E402
from speckle_kernels.batch_renorm_act_triton import block_offsets  # noqa: E402
from speckle_kernels.batch_renorm_triton_kernels import first_offsets, tile_offsets  # noqa: E402


@triton.jit
def _tile_probe(out_ptr, first_ptr, t, c0, C, INNER, n_inner_blocks, s_o, s_i, s_c,
                CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_I: tl.constexpr):
    c1 = c0 + tl.arange(0, BLOCK_C)
    offs, _, _ = tile_offsets(t, c1, C, INNER, n_inner_blocks, s_o, s_i, s_c, CHANNELS_LAST, INDEX_64, BLOCK_I)
    if CHANNELS_LAST:  # (BLOCK_I, BLOCK_C): store row-major
        here = tl.arange(0, BLOCK_I)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    else:              # (BLOCK_C, BLOCK_I)
        here = tl.arange(0, BLOCK_C)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
    tl.store(out_ptr + here, offs.to(tl.int64))
    tl.store(first_ptr + tl.arange(0, BLOCK_C), first_offsets(c1, s_c, INDEX_64).to(tl.int64))


@triton.jit
def _block_probe(out_ptr, n, l0, c0, s_n, s_l, s_c, INDEX_64: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_I: tl.constexpr):
    ch = c0 + tl.arange(0, BLOCK_C)[:, None]
    l = l0 + tl.arange(0, BLOCK_I)[None, :]
    offs = block_offsets(n, l, ch, s_n, s_l, s_c, INDEX_64)
    tl.store(out_ptr + tl.arange(0, BLOCK_C)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :],
             offs.to(tl.int64))


# (N, C, L) of tensors past 2**31 elements, each laid out both ways
BIG = [(4, 64, 2 ** 24), (1, 1024, 2 ** 22), (3, 3, 2 ** 30)]


@pytest.mark.parametrize("shape", BIG)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_batch_renorm_tile_offsets_past_2_31(shape, channels_last):
    n, c, L = shape
    if channels_last:
        outer, inner, (s_o, s_i, s_c) = 1, n * L, (0, c, 1)
        block_c = min(tc.next_power_of_2(c), 128)
        block_i = min(tc.TILE_ELEMENTS // block_c, tc.next_power_of_2(inner))
    else:
        outer, inner, (s_o, s_i, s_c) = n, L, (c * L, 1, L)
        block_i = min(tc.next_power_of_2(inner), tc.TILE_ELEMENTS)
        block_c = min(max(tc.TILE_ELEMENTS // block_i, 1), tc.next_power_of_2(c))
    n_inner_blocks = tc.cdiv(inner, block_i)
    c_blocks = tc.cdiv(c, block_c)
    assert tc.needs_index_64((outer - 1, s_o), (n_inner_blocks * block_i - 1, s_i), (c_blocks * block_c - 1, s_c))
    c0 = (c_blocks - 1) * block_c
    for t in (outer * n_inner_blocks - 1, (outer * n_inner_blocks) // 2 + 1):  # the last tile, one mid-way
        out = torch.empty(block_c * block_i, dtype=torch.int64)
        first = torch.empty(block_c, dtype=torch.int64)
        _tile_probe[(1,)](out, first, t, c0, c, inner, n_inner_blocks, s_o, s_i, s_c,
                          CHANNELS_LAST=channels_last, INDEX_64=True, BLOCK_C=block_c, BLOCK_I=block_i)
        o, i0 = divmod(t, n_inner_blocks)
        idx = torch.arange(block_i, dtype=torch.int64) + i0 * block_i
        ch = torch.arange(block_c, dtype=torch.int64) + c0
        if channels_last:
            want = o * s_o + idx[:, None] * s_i + ch[None, :] * s_c
        else:
            want = o * s_o + idx[None, :] * s_i + ch[:, None] * s_c
        assert torch.equal(out, want.flatten()), f"tile {t}: offsets wrapped (max {want.max().item()})"
        assert torch.equal(first, ch * s_c)


@pytest.mark.parametrize("shape", BIG)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_norm_block_offsets_past_2_31(shape, channels_last):
    n, c, L = shape
    s_n, s_l, s_c = (c * L, c, 1) if channels_last else (c * L, 1, L)
    block_c, block_i = 4, 16
    assert tc.needs_index_64((n - 1, s_n), (L - 1, s_l), (c - 1, s_c))
    for nn, l0, c0 in ((n - 1, L - block_i, c - block_c), (n // 2, L // 2 - 3, c // 2)):
        out = torch.empty(block_c * block_i, dtype=torch.int64)
        _block_probe[(1,)](out, nn, l0, c0, s_n, s_l, s_c, INDEX_64=True, BLOCK_C=block_c, BLOCK_I=block_i)
        ch = torch.arange(block_c, dtype=torch.int64)[:, None] + c0
        l = torch.arange(block_i, dtype=torch.int64)[None, :] + l0
        want = nn * s_n + l * s_l + ch * s_c
        assert torch.equal(out, want.flatten()), "offsets wrapped"


def test_host_rule_switches_where_the_largest_offset_passes_2_31():
    # the largest offset any lane forms, masked lanes included: one element less stays in int32
    assert not tc.needs_index_64((0, 0), (2 ** 31 - 1, 1))
    assert tc.needs_index_64((0, 0), (2 ** 31, 1))
    assert tc.needs_index_64((1, 2 ** 30), (2 ** 30, 1))
