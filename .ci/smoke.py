"""CI's smoke test of an installed speckle_kernels (.ci/run steps b-d): FusedBatchRenorm2d
forward+backward with backend="cpu", a small case-kit check (BatchRenorm, the norm block, the
noise stream) on the C++ CPU kernels, then the report, which must name the kernels' origin and
variant.

usage: python smoke.py [--how aot|jit] [--variant NAME] [--cases N]
The case kit is the installed package's own (speckle_kernels.testing).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--how", choices=("aot", "jit"))
    parser.add_argument("--variant")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    t0 = time.time()
    import speckle_kernels as sk
    from speckle_kernels import noise as N

    # the headline use: a module's forward+backward on the C++ kernel, asked for by name
    m = sk.FusedBatchRenorm2d(8, backend="cpu")
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    m(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    from speckle_kernels.testing import batch_renorm as renorm, batch_renorm_act as block, noise
    small = sorted(renorm.CASES, key=lambda c: torch.Size(c.shape).numel())[:args.cases]
    for case in small:
        verdict = renorm.judge("cpu", renorm.draw(case, seed=len(case.id)))
        assert not verdict.failures, verdict.report() + "\n" + "\n".join(verdict.failures)
    small = sorted(block.CASES, key=lambda c: torch.Size(c.base.shape).numel())[:args.cases]
    for case in small:
        verdict = block.judge("cpu", case, block.draw(case, seed=len(case.id)))
        assert not verdict.failures, verdict.report() + "\n" + "\n".join(verdict.failures)
    for case in noise.STREAM_CASES[:args.cases]:
        xs = noise.stream_input(case)
        y = N.add_speckle_noise(xs, backend="cpu", **case.kwargs())
        worst = (y.float() - noise.expected_noise(xs, **case.kwargs())).abs().max().item() if y.numel() else 0.0
        assert worst <= noise.stream_tolerance(xs, out_dtype=case.dtype, **case.kwargs()), case.id

    from speckle_kernels.__main__ import report  # in this process: under QEMU a child would run natively
    report = report()
    print(report)
    cpu_line = next(line for line in report.splitlines() if line.startswith("CPU tensors:"))
    assert "C++ kernels" in cpu_line, cpu_line
    if args.how:
        assert {"aot": "built ahead of time", "jit": "built just in time"}[args.how] in cpu_line, cpu_line
    in_use = torch.ops.speckle_kernels.cpu_capability()
    assert f"kernel variant in use: {in_use}" in report, report
    if args.variant:
        assert in_use == args.variant, f"the {in_use} kernels run, not {args.variant}"
    print(f"smoke: ok ({in_use} kernels, {len(small)} cases a kit, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
