"""What a fresh output costs on this CPU: the floor under the BatchRenorm forward.

    python -m benchmarks.tools.page_fault_floor [--out FILE.md]

PyTorch's CPU allocator hands large blocks back to the OS, so every fresh output tensor is
faulted in (and zeroed by the kernel) page by page. This is why the C++ kernels take their
outputs from a cache of released buffers with transparent huge pages asked for
(csrc/cpu/output_cache.cpp): "copy into a warm tensor" is what a cached output costs. Medians
of 15 calls at (32, 64, 128, 128) fp32, with torch's intra-op threads.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def _fresh(like: torch.Tensor, huge: bool) -> torch.Tensor:
    out = torch.empty_like(like)
    if huge:  # the 2 MB-aligned interior, as the C++ kernels do
        begin = out.data_ptr()
        first, last = (begin + HUGE - 1) & ~(HUGE - 1), (begin + out.nbytes) & ~(HUGE - 1)
        if last > first:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                                       MADV_HUGEPAGE)
    return out


def _median_ms(fn, reps=15, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    x = torch.randn(32, 64, 128, 128)
    warm = torch.empty_like(x).copy_(x)
    rows = [
        ("read x once (x.sum())", lambda: x.sum()),
        ("copy into a warm tensor", lambda: warm.copy_(x)),
        ("copy into a fresh tensor (4 KB pages)", lambda: _fresh(x, False).copy_(x)),
        ("copy into a fresh tensor (huge pages asked for)", lambda: _fresh(x, True).copy_(x)),
    ]
    lines = [f"# Fresh-output cost, (32, 64, 128, 128) fp32, {torch.get_num_threads()} threads, "
             f"{time.strftime('%Y-%m-%d')}", "", "| operation | median |", "|---|---:|"]
    for name, fn in rows:
        lines.append(f"| {name} | {_median_ms(fn):.2f} ms |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from speckle_models.atomic_write import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
