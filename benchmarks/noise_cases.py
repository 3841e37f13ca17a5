"""Speckle-noise benchmark cases: shapes, implementations, and the check each runs in its
setup (kernels: the exact documented Philox stream; the compiled reference: the eager
reference's distribution).

Bytes: batch maker = uint8 read + two writes of the output dtype; add_speckle_noise = read x +
write y.
"""
from __future__ import annotations

import math

import torch

from speckle_kernels.testing import noise as noise_kit

from .common import BATCH, IMAGE, KERNEL_BACKENDS, Unavailable, assert_close, compile_fresh, tensor_bytes

NOISE_IMPLS = ("reference", "reference-compiled", "triton", "cuda", "cpu")


def batch_maker_bytes(shape, out_dtype) -> int:
    return tensor_bytes(shape, torch.uint8) + 2 * tensor_bytes(shape, out_dtype)



# The paper's middle setting: factor 5 on sigma 0.1 (one sigma for all images, so the noisy
# values are independent draws and the compiled reference can be checked statistically).
NOISE_KW = dict(factor=5.0, sigma_mult=0.1, sigma_add=0.02, distribution="gaussian", clip=True)


def noise_shapes(size: str, device: torch.device) -> list[tuple[int, ...]]:
    """(N, 1, H, W) uint8 batches: the paper's batch, and on a GPU at full size a large one
    where the kernel can reach the memory bound (a 32-image batch is latency-bound there)."""
    if size == "full" and device.type == "cuda":
        return [(BATCH, 1, IMAGE, IMAGE), (256, 1, 2 * IMAGE, 2 * IMAGE)]
    return [(BATCH if size == "full" else 8, 1, IMAGE, IMAGE)]


def noise_impl(name: str, op: str, device: torch.device):
    """f(x) for op "batch" (uint8 -> (noisy, clean)) or "add" (float x -> y); or Unavailable."""
    from speckle_kernels import noise as N
    from speckle_kernels.reference import noisy_batch_reference, speckle_noise_reference

    if name in ("reference", "reference-compiled"):
        # torch's global generator: a Generator argument would stop torch.compile's tracing
        ref = noisy_batch_reference if op == "batch" else speckle_noise_reference
        kw = {k: v for k, v in NOISE_KW.items()}

        def reference(x, out_dtype=torch.float32):
            if op == "batch":
                return ref(x, out_dtype=out_dtype, **kw)
            return ref(x, **kw)
        return compile_fresh(reference) if name == "reference-compiled" else reference
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown implementation {name!r}")
    if name == "triton" and device.type != "cuda":
        raise Unavailable("Triton runs on CPU tensors only under its interpreter, which is not a speed")
    fused = N.make_noisy_batch if op == "batch" else N.add_speckle_noise
    probe = torch.zeros(1, 1, 4, 4, dtype=torch.uint8 if op == "batch" else torch.float32, device=device)
    try:
        fused(probe, backend=name, **NOISE_KW)
    except (RuntimeError, TypeError) as e:
        raise Unavailable(f"backend={name!r} is not available for the noise here: {e}") from e

    def kernel(x, out_dtype=torch.float32):
        if op == "batch":
            return fused(x, out_dtype=out_dtype, seed=3, offset=0, backend=name, **NOISE_KW)
        return fused(x, seed=3, offset=0, backend=name, **NOISE_KW)
    return kernel


def check_noise(name: str, fn, op: str, x: torch.Tensor, out_dtype=torch.float32) -> None:
    """Kernels: the values of the documented Philox stream, to the tolerance the tests derive
    (speckle_kernels/testing/noise.py). torch.compile draws other random numbers than eager torch, so the
    compiled reference is held to the exact clean output and to the eager reference's
    distribution: mean and spread of the noisy values within 5 standard errors."""
    if name == "reference":
        return
    if op == "batch":
        noisy, clean = fn(x, out_dtype)
        v = x.float() / 255
        expected_clean = (v - 0.5) / 0.5
        if noisy.dtype != out_dtype or clean.dtype != out_dtype or noisy.shape != x.shape:
            raise AssertionError(f"{name}: outputs {noisy.dtype}/{clean.dtype} {tuple(noisy.shape)}")
        low = out_dtype != torch.float32
        # fp32: v = u8/255 is correctly rounded by the CUDA kernel and by torch on the CPU, but
        # torch's CUDA division by a scalar multiplies by the reciprocal (<= 1.5 ulp of v < 1,
        # i.e. 1.5 * 2**-24) and inductor may fuse 2*v - 1 differently: after the doubling,
        # |diff| <= 3 * 2**-24 < 2**-22.
        assert_close(clean, expected_clean, atol=1e-7 if low else 2.0**-22, rtol=2**-7 if low else 0.0,
               name=f"{name} clean")
    else:
        noisy, v = fn(x), x
    if name in KERNEL_BACKENDS:  # the stream and its tolerance from the tests' kit
        kw = {**NOISE_KW, "seed": 3, "offset": 0}
        expected = noise_kit.expected_noise(v, **kw)
        tol = noise_kit.stream_tolerance(v, out_dtype=noisy.dtype, **kw)
        if op == "batch":
            expected, tol = (expected - 0.5) / 0.5, 2 * tol
        assert_close(noisy, expected, atol=tol, rtol=0.0, name=f"{name} noisy")
        return
    # The noise alone (noisy minus clean) must have the eager reference's mean and spread. Both
    # are means of n independent values: 5 standard errors of a difference of two such means,
    # doubled for the spread (its error also depends on the kurtosis).
    eager = noise_impl("reference", op, x.device)
    if op == "batch":
        ref_noisy, ref_clean = eager(x, out_dtype)
        a, b = (noisy.double() - clean.double()).flatten(), (ref_noisy.double() - ref_clean.double()).flatten()
    else:
        a, b = (noisy.double() - x.double()).flatten(), (eager(x).double() - x.double()).flatten()
    n, spread = a.numel(), b.std().item()
    bound = 5 * spread * math.sqrt(2 / n)
    if abs(a.mean().item() - b.mean().item()) > bound:
        raise AssertionError(f"{name}: noise mean {a.mean().item():.5g} vs eager {b.mean().item():.5g}")
    if abs(a.std().item() - spread) > 2 * bound:
        raise AssertionError(f"{name}: noise spread {a.std().item():.5g} vs eager {spread:.5g}")
