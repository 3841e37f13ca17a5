"""What a layer call asks of the host: the ops it dispatches, the tensors it creates outright,
and the Triton kernels it launches (benchmarks/test_bench_host_time.py records these beside the
host time of a call; tests/test_host_calls.py holds the layers to them).

    with HostCalls() as calls:
        layer(x).sum().backward()
    calls.ops, calls.created, calls.host_created, calls.triton_launches

ops: every op that reaches the dispatcher (aten and the package's custom ops; on a GPU each one
that computes is a kernel launch). created: factory ops (empty, zeros, full, randint, a tensor
made from Python data...), each a fresh allocation; host_created: those whose tensor lives on
the host while the layer's input does not (on a GPU these are the per-call host tensors a layer
must not make). triton_launches: launches of the package's Triton kernels (they bypass the
dispatcher), counted by wrapping each kernel object (TRITON_KERNELS) for the duration.
"""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TRITON_KERNELS = (("speckle_kernels.batch_renorm_triton_kernels", "channel_sums_kernel"),
                  ("speckle_kernels.batch_renorm_triton_kernels", "per_channel_affine_kernel"),
                  ("speckle_kernels.batch_renorm_triton_kernels", "forward_finalize_kernel"),
                  ("speckle_kernels.batch_renorm_triton_kernels", "backward_finalize_kernel"),
                  ("speckle_kernels.batch_renorm_act_triton", "batch_renorm_act_kernel"),
                  ("speckle_kernels.noise_triton", "speckle_kernel"))
_FACTORIES = {"empty", "empty_strided", "empty_like", "zeros", "zeros_like", "ones", "ones_like",
              "full", "full_like", "scalar_tensor", "lift_fresh", "lift_fresh_copy", "arange",
              "randint", "rand", "randn", "random_", "new_empty", "new_zeros", "new_full",
              "new_empty_strided", "tensor"}


@contextlib.contextmanager
def wrapped_triton_kernels(wrap):
    """Replace each package Triton kernel by wrap(kernel) for the duration (host code looks
    them up as module attributes at call time)."""
    saved = []
    try:
        for module_name, name in TRITON_KERNELS:
            module = importlib.import_module(module_name)
            kernel = getattr(module, name)
            saved.append((module, name, kernel))
            setattr(module, name, wrap(kernel))
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


class _CountingKernel:
    def __init__(self, kernel, counter: Counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter[self.kernel.__name__] += 1
            return launch(*args, **kwargs)
        return counted


class HostCalls(TorchDispatchMode):
    """Counts what the code run inside it asks of the host (see the module header)."""

    def __init__(self, input_device=None):
        super().__init__()
        self.input_device = torch.device(input_device) if input_device is not None else None
        self.ops, self.created, self.host_created = 0, 0, 0
        self.by_op: Counter = Counter()
        self.launches: Counter = Counter()
        self._kernels = None

    def __enter__(self):
        self._kernels = wrapped_triton_kernels(lambda k: _CountingKernel(k, self.launches))
        self._kernels.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._kernels.__exit__(*exc)

    @property
    def triton_launches(self) -> int:
        return sum(self.launches.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops += 1
        self.by_op[name] += 1
        if name in _FACTORIES:
            self.created += 1
            tensors = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
            if self.input_device is not None and self.input_device.type != "cpu" \
                    and any(t.device.type == "cpu" for t in tensors):
                self.host_created += 1
        return out
